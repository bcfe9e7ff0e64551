"""Fine-tuning recipes, with Megatron Bridge's names: `<model>_sft_config` (every weight trained) and
`<model>_peft_config` (LoRA adapters on a frozen base), for Llama 3.2 1B, Llama 3 8B and Qwen 3
0.6B / 8B, and the embedded `tiny_gpt_sft_config` / `tiny_gpt_peft_config` that fine-tune the
default recipe's model on CPU.

    viaduct finetune --recipe llama32_1b_peft_config \\
        checkpoint.pretrained_checkpoint=/models/Llama-3.2-1B dataset.dataset_root=/data/my_sft

The data is a `FinetuningDatasetConfig` (`dataset_root` with training/validation/test JSONL files;
the built-in `builtin:pydoc-sft` by default) in padded batches, or packed (`packed_sequence=True`);
the tokenizer follows a Hugging Face base directory. Keyword arguments: those of the pretraining
recipes (`viaduct.recipes.common.PretrainKwargs`, without `data_paths` / `mock`) and `FinetuneKwargs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from viaduct.models import (
    GPTModelProvider,
    Llama3ModelProvider8B,
    Llama32ModelProvider1B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider600M,
)
from viaduct.peft import LoRA
from viaduct.peft.base import PEFT
from viaduct.recipes.common import PretrainKwargs, apply_recipe_kwargs, pretrain_common, set_run_dir
from viaduct.recipes.gpt import tiny_gpt_pretrain_config
from viaduct.recipes.registry import recipe
from viaduct.training.config import (
    ConfigContainer,
    FinetuningDatasetConfig,
    PackedSequenceSpecs,
    TokenizerConfig,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

EXAMPLE_DATA = "builtin:pydoc-sft"
"""The default `dataset_root` of the fine-tuning recipes: a small instruction set built on first use."""


class FinetuneKwargs(PretrainKwargs, total=False):
    """The keyword arguments of the fine-tuning recipes: the pretraining recipes' (but `data_paths`
    and `mock`, which name pretraining data) and these."""

    pretrained_checkpoint: str | None
    """checkpoint.pretrained_checkpoint: the base model (a viaduct checkpoint or a Hugging Face dir)."""
    peft: str | PEFT | None
    """The PEFT method: "lora", "dora", a PEFT object, or None for full fine-tuning (the recipe's own)."""
    packed_sequence: bool
    """Pack examples into sequences of seq_length tokens (dataset.packed_sequence_specs)."""
    finetune_lr: float
    """optimizer.lr (Megatron Bridge's name in fine-tuning recipes)."""
    dataset_root: str
    """dataset.dataset_root: the directory of training.jsonl, validation.jsonl and test.jsonl."""


_FINETUNE_ONLY = ("pretrained_checkpoint", "peft", "packed_sequence", "finetune_lr", "dataset_root")
_PRETRAIN_DATA = ("data_paths", "mock")


def _peft_of(value: str | PEFT | None) -> PEFT | None:
    if value is None or isinstance(value, PEFT):
        return value
    chosen = PEFT.from_string(value)  # "lora" / "dora": the names `peft=lora` takes on the command line
    assert isinstance(chosen, PEFT)
    return chosen


def finetune_common(
    model: GPTModelProvider, *, name: str, peft: bool, seq_length: int = 2048
) -> ConfigContainer:
    """A fine-tuning config around `model`: the pretraining template, then SFT data in padded
    batches, a short constant-after-warmup schedule, the tokenizer of the base, and LoRA (dim 32,
    alpha 32 on the four projections of each layer, Bridge's defaults) when `peft`."""
    model.seq_length = seq_length
    cfg = pretrain_common(model, name=name)
    t = cfg.train
    t.train_iters, t.global_batch_size, t.micro_batch_size = 1000, 128, 1
    t.eval_interval, t.eval_iters = 100, 8
    # Bridge's fine-tuning learning rates: adapters take a larger step than full weights.
    cfg.optimizer.lr = 1e-4 if peft else 5e-6
    cfg.optimizer.min_lr = 0.0
    cfg.optimizer.weight_decay = 0.1
    cfg.scheduler.lr_warmup_iters = 50
    cfg.scheduler.lr_decay_style = "cosine"
    cfg.dataset = FinetuningDatasetConfig(dataset_root=EXAMPLE_DATA, seed=1234)
    cfg.tokenizer = TokenizerConfig()  # follows a Hugging Face base directory
    cfg.checkpoint.save_interval = 100
    if peft:
        cfg.peft = LoRA()
    return cfg


def apply_finetune_kwargs(
    cfg: ConfigContainer, kwargs: dict[str, Any], *, recipe: str, default_name: str
) -> ConfigContainer:
    """Apply a fine-tuning recipe's keyword arguments (`FinetuneKwargs`); returns `cfg`."""
    refused = [k for k in _PRETRAIN_DATA if k in kwargs]
    if refused:
        raise TypeError(
            f"{recipe}() takes no {', '.join(refused)}: fine-tuning data is a dataset directory "
            "(dataset_root=...)"
        )
    rest = {k: v for k, v in kwargs.items() if k not in _FINETUNE_ONLY}
    if "pretrained_checkpoint" in kwargs:
        cfg.checkpoint.pretrained_checkpoint = kwargs["pretrained_checkpoint"]
    if "peft" in kwargs:
        cfg.peft = _peft_of(kwargs["peft"])
    if "finetune_lr" in kwargs:
        cfg.optimizer.lr = kwargs["finetune_lr"]
    if "dataset_root" in kwargs:
        assert isinstance(cfg.dataset, FinetuningDatasetConfig)
        cfg.dataset.dataset_root = kwargs["dataset_root"]
    if kwargs.get("packed_sequence"):
        assert isinstance(cfg.dataset, FinetuningDatasetConfig)
        # Packs of seq_length tokens (-1), one per micro-batch as Bridge requires.
        cfg.dataset.packed_sequence_specs = PackedSequenceSpecs()
        cfg.train.micro_batch_size = 1
    return apply_recipe_kwargs(cfg, rest, recipe=recipe, default_name=default_name)


def _sharded_full_finetune(cfg: ConfigContainer) -> None:
    """Full fine-tuning of an 8B model: FSDP2 over the data-parallel ranks (weights, gradients and
    Adam state of 8B parameters do not fit one GPU), built on the meta device."""
    cfg.ddp.use_distributed_optimizer = True
    cfg.ddp.data_parallel_sharding_strategy = "optim_grads_params"
    cfg.model.init_model_with_meta_device = True


@recipe()
def llama32_1b_sft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Llama 3.2 1B, full fine-tuning (SFT) on one GPU, sequences of 2048 tokens."""
    cfg = finetune_common(Llama32ModelProvider1B(), name="llama32_1b_sft", peft=False)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="llama32_1b_sft_config", default_name="llama32_1b_sft"
    )


@recipe()
def llama32_1b_peft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Llama 3.2 1B, LoRA fine-tuning (adapters on a frozen bf16 base), sequences of 2048 tokens."""
    cfg = finetune_common(Llama32ModelProvider1B(), name="llama32_1b_peft", peft=True)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="llama32_1b_peft_config", default_name="llama32_1b_peft"
    )


@recipe()
def llama3_8b_sft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Llama 3 8B, full fine-tuning (SFT) sharded with FSDP2 over 8 GPUs, sequences of 4096 tokens."""
    cfg = finetune_common(Llama3ModelProvider8B(), name="llama3_8b_sft", peft=False, seq_length=4096)
    _sharded_full_finetune(cfg)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="llama3_8b_sft_config", default_name="llama3_8b_sft"
    )


@recipe()
def llama3_8b_peft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Llama 3 8B, LoRA fine-tuning on one 80 GB GPU (frozen bf16 base), sequences of 4096 tokens."""
    cfg = finetune_common(Llama3ModelProvider8B(), name="llama3_8b_peft", peft=True, seq_length=4096)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="llama3_8b_peft_config", default_name="llama3_8b_peft"
    )


@recipe()
def qwen3_600m_sft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Qwen 3 0.6B, full fine-tuning (SFT) on one GPU, sequences of 2048 tokens."""
    cfg = finetune_common(Qwen3ModelProvider600M(), name="qwen3_600m_sft", peft=False)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="qwen3_600m_sft_config", default_name="qwen3_600m_sft"
    )


@recipe()
def qwen3_600m_peft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Qwen 3 0.6B, LoRA fine-tuning on one GPU, sequences of 2048 tokens."""
    cfg = finetune_common(Qwen3ModelProvider600M(), name="qwen3_600m_peft", peft=True)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="qwen3_600m_peft_config", default_name="qwen3_600m_peft"
    )


@recipe()
def qwen3_8b_sft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Qwen 3 8B, full fine-tuning (SFT) sharded with FSDP2 over 8 GPUs, sequences of 4096 tokens."""
    cfg = finetune_common(Qwen3ModelProvider8B(), name="qwen3_8b_sft", peft=False, seq_length=4096)
    _sharded_full_finetune(cfg)
    return apply_finetune_kwargs(cfg, dict(kwargs), recipe="qwen3_8b_sft_config", default_name="qwen3_8b_sft")


@recipe()
def qwen3_8b_peft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """Qwen 3 8B, LoRA fine-tuning on one 80 GB GPU (frozen bf16 base), sequences of 4096 tokens."""
    cfg = finetune_common(Qwen3ModelProvider8B(), name="qwen3_8b_peft", peft=True, seq_length=4096)
    return apply_finetune_kwargs(
        cfg, dict(kwargs), recipe="qwen3_8b_peft_config", default_name="qwen3_8b_peft"
    )


def _tiny(peft: bool, kwargs: dict[str, Any], recipe: str) -> ConfigContainer:
    """The default recipe's model and tokenizer fine-tuned on the built-in instruction set, from the
    default recipe's own checkpoints (run `viaduct pretrain` first)."""
    name = "tiny_gpt_peft" if peft else "tiny_gpt_sft"
    cfg = tiny_gpt_pretrain_config()
    cfg.dataset = FinetuningDatasetConfig(dataset_root=EXAMPLE_DATA, seed=1234, num_workers=0)
    cfg.checkpoint.pretrained_checkpoint = "./runs/tiny_gpt/checkpoints"
    set_run_dir(cfg, "./runs", name)
    t = cfg.train
    t.train_iters, t.global_batch_size, t.micro_batch_size, t.eval_interval, t.eval_iters = 60, 16, 8, 20, 4
    cfg.optimizer.lr, cfg.optimizer.min_lr = (2e-3, 2e-4) if peft else (3e-4, 3e-5)
    if peft:
        cfg.peft = LoRA(dim=8, alpha=16)
    return apply_finetune_kwargs(cfg, kwargs, recipe=recipe, default_name=name)


@recipe()
def tiny_gpt_sft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """The embedded default model fine-tuned (all weights) on the built-in instruction set, on CPU."""
    return _tiny(False, dict(kwargs), "tiny_gpt_sft_config")


@recipe()
def tiny_gpt_peft_config(**kwargs: Unpack[FinetuneKwargs]) -> ConfigContainer:
    """The embedded default model fine-tuned with LoRA on the built-in instruction set, on CPU."""
    return _tiny(True, dict(kwargs), "tiny_gpt_peft_config")
