"""GPT recipes: the embedded default that trains on a laptop CPU, and GPT-2."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viaduct.models import GPT2ModelProvider124M, GPTModelProvider
from viaduct.recipes.common import (
    DEFAULT_RUNS_DIR,
    PretrainKwargs,
    apply_recipe_kwargs,
    pretrain_common,
    set_run_dir,
)
from viaduct.recipes.llama import llama_model
from viaduct.recipes.registry import recipe
from viaduct.training.config import (
    CheckpointConfig,
    ConfigContainer,
    GPTDatasetConfig,
    LoggerConfig,
    OptimizerConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack


def tiny_gpt_model(seq_length: int = 256) -> GPTModelProvider:
    """A 4-layer, 256-wide Llama-style GPT (about 4M parameters with the 4,096-token built-in vocabulary)."""
    return llama_model(
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=704,
        num_attention_heads=4,
        seq_length=seq_length,
        share_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=64,
    )


@recipe("default", "tiny_gpt")
def tiny_gpt_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """The embedded default: a tiny GPT trained on CPU in minutes, with nothing to download.

    Its outputs go to ./runs/tiny_gpt (`checkpoints/`, `tb_logs/`, `loss_curves.html`).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    seq_length = 256
    cfg = ConfigContainer(
        model=tiny_gpt_model(seq_length),
        train=TrainingConfig(
            train_iters=200, global_batch_size=16, micro_batch_size=8, eval_interval=50, eval_iters=5
        ),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, adam_beta2=0.95, clip_grad=1.0),
        scheduler=SchedulerConfig(
            lr_decay_style="cosine", lr_warmup_fraction=0.1, start_weight_decay=0.1, end_weight_decay=0.1
        ),
        # Python's own documentation (pydoc_data), with a BPE tokenizer trained on it: both built on
        # first use and cached (viaduct.data.builtin); nothing is downloaded.
        dataset=GPTDatasetConfig(data_path="builtin:pydoc", split="90,5,5", random_seed=1234, num_workers=0),
        logger=LoggerConfig(log_interval=10, log_throughput=True),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="builtin:pydoc-bpe"),
        checkpoint=CheckpointConfig(),
    )
    # Like every recipe: checkpoints and TensorBoard logs in one run directory, ./runs/tiny_gpt (a
    # second run in the same directory resumes it; the checkpoint of this model takes a second).
    set_run_dir(cfg, DEFAULT_RUNS_DIR, "tiny_gpt")
    return apply_recipe_kwargs(cfg, kwargs, recipe="tiny_gpt_pretrain_config", default_name="tiny_gpt")


@recipe("gpt2_124m")
def gpt2_124m_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """GPT-2 124M shape (12 layers, 768 wide, learned positions, 1024-token context).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(GPT2ModelProvider124M(), name="gpt2_124m")
    return apply_recipe_kwargs(cfg, kwargs, recipe="gpt2_124m_pretrain_config", default_name="gpt2_124m")
