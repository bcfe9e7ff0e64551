"""Fine-tuning with LoRA / DoRA through `finetune()`: adapters on a loaded base, adapter-only
checkpoints that resume bitwise, frozen 16-bit base weights without optimizer state, and data-parallel
and sharded layouts that match one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from viaduct.config import ConfigError
from viaduct.inference import load_checkpoint
from viaduct.testing import run_distributed, tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.checkpoint.inspect import inspect_checkpoint
from viaduct.training.config import TokenizerConfig
from viaduct.training.pretrain import finetune, pretrain

pytestmark = pytest.mark.slow

# An even vocabulary: tensor parallel 2 pads none, so the base loads as saved.
VOCAB = ("tokenizer.tokenizer_type=NullTokenizer", "tokenizer.vocab_size=256")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny pretrained checkpoint (2 steps) to fine-tune from."""
    root = tmp_path_factory.mktemp("base") / "ckpt"
    pretrain(
        tiny_pretrain_config("train.train_iters=2", "train.eval_iters=0", f"checkpoint.save={root}", *VOCAB)
    )
    return str(root)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def _plain(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def _finetune(rank: int, world: int, base: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    """A LoRA run from `base`: its losses, and every parameter at the end (gathered), with its dtype,
    whether it had a gradient and whether the optimizer holds it."""
    out: dict[str, Any] = {"losses": []}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            out["losses"].append(float(ctx.metrics["losses"]["lm loss"]))

    def train_end(ctx: CallbackContext) -> None:
        assert ctx.model is not None and ctx.optimizer is not None
        stepped = {id(slot.param) for slot in ctx.optimizer.slots}
        out["params"] = {_plain(n): _full(p) for n, p in ctx.model.named_parameters()}
        out["info"] = {
            _plain(n): (
                str((p.to_local() if isinstance(p, DTensor) else p).dtype),
                p.requires_grad,
                p.grad is not None,
                id(p) in stepped,
            )
            for n, p in ctx.model.named_parameters()
        }

    cfg = tiny_pretrain_config(
        "train.train_iters=4",
        "train.eval_iters=0",
        "peft=lora",
        "peft.dim=4",
        "peft.alpha=8",
        "optimizer.lr=0.01",
        f"checkpoint.pretrained_checkpoint={base}",
        *VOCAB,
        *overrides,
    )
    finetune(cfg, callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}])
    return out


def _base_params(base: str) -> dict[str, torch.Tensor]:
    """The base checkpoint's weights (fp32)."""
    model = load_checkpoint(base, device="cpu").model
    return {n: _full(p) for n, p in model.named_parameters()}


def test_lora_starts_at_the_base_model_and_trains_only_adapters(base: str, tmp_path: Path) -> None:
    save = tmp_path / "adapters"
    lora = _finetune(0, 1, base, (f"checkpoint.save={save}", "checkpoint.save_interval=4"))
    full = {"losses": []}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            full["losses"].append(float(ctx.metrics["losses"]["lm loss"]))

    finetune(
        tiny_pretrain_config(
            "train.train_iters=1", "train.eval_iters=0", f"checkpoint.pretrained_checkpoint={base}", *VOCAB
        ),
        callbacks=[{"on_train_step_end": step_end}],
    )
    # B = 0: the adapted model computes exactly the base model's function at the first step.
    assert lora["losses"][0] == full["losses"][0]
    assert lora["losses"][-1] < lora["losses"][0]

    weights = _base_params(base)
    adapters = {n for n in lora["params"] if ".adapter." in n}
    assert len(adapters) == 2 * 4 * 2  # A and B on 4 linear layers of 2 layers
    for name, value in lora["params"].items():
        if name in adapters:
            continue
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)  # untouched
        _, trainable, had_grad, stepped = lora["info"][name]
        assert not trainable and not had_grad and not stepped, name
    b = [v for n, v in lora["params"].items() if n.endswith("linear_out.weight")]
    assert all(bool(v.abs().sum() > 0) for v in b)  # the adapters did train

    # The checkpoint holds the adapters, their optimizer state and the train state: no base tensor.
    info = inspect_checkpoint(save)
    names = [t["name"] for t in info["tensors"]]
    assert names and all(".adapter." in n for n in names), names
    assert any(n.startswith("optimizer.exp_avg.") for n in names)
    meta = json.loads((save / "iter_0000004" / "metadata.json").read_text())
    assert meta["contents"]["model"] == "adapters" and meta["peft_base"] == base


def test_adapter_checkpoints_resume_bitwise(base: str, tmp_path: Path) -> None:
    straight = _finetune(0, 1, base, ())
    save = tmp_path / "run"
    first = _finetune(
        0, 1, base, (f"checkpoint.save={save}", "checkpoint.save_interval=2", "train.exit_interval=2")
    )
    resumed = _finetune(0, 1, base, (f"checkpoint.save={save}", f"checkpoint.load={save}"))
    assert first["losses"] + resumed["losses"] == straight["losses"]
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=0, msg=name)


def test_a_full_checkpoint_in_load_is_refused_with_peft(base: str) -> None:
    with pytest.raises(ConfigError, match="holds a full-model checkpoint"):
        _finetune(0, 1, base, (f"checkpoint.load={base}",))


def test_the_pretrained_checkpoint_must_not_be_an_adapter_checkpoint(base: str, tmp_path: Path) -> None:
    save = tmp_path / "adapters"
    _finetune(0, 1, base, (f"checkpoint.save={save}", "train.train_iters=1"))
    with pytest.raises(ConfigError, match="is an adapter checkpoint"):
        _finetune(0, 1, str(save), ())


def test_frozen_16bit_base_has_no_master_gradients_or_optimizer_state(base: str) -> None:
    run = _finetune(0, 1, base, ("mixed_precision=bf16_mixed",))
    for name, (dtype, trainable, had_grad, stepped) in run["info"].items():
        assert dtype == "torch.bfloat16", name
        assert trainable == stepped == (".adapter." in name), name
        assert not had_grad or ".adapter." in name, name


def test_dora_starts_at_the_loaded_base(base: str) -> None:
    lora = _finetune(0, 1, base, ("train.train_iters=1",))
    dora = _finetune(0, 1, base, ("peft=dora", "peft.dim=4", "peft.alpha=8", "train.train_iters=1"))
    # The magnitudes are the loaded base's row norms, so the first loss is the base model's.
    torch.testing.assert_close(torch.tensor(dora["losses"]), torch.tensor(lora["losses"]), rtol=1e-6, atol=0)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("method", "layout"),
    [
        ((), ()),
        ((), ("ddp.use_distributed_optimizer=true",)),
        ((), ("model.tensor_model_parallel_size=2", "model.sequence_parallel=true")),
        (("peft=dora", "peft.dim=4", "peft.alpha=8"), ("model.tensor_model_parallel_size=2",)),
        (
            ("peft.target_modules=['linear_qkv','*.layers.1.*.linear_fc2']",),
            ("model.pipeline_model_parallel_size=2",),
        ),
    ],
    ids=["ddp", "fsdp", "tp-sp", "dora-tp", "pp"],
)
def test_lora_under_parallel_layouts_matches_one_process(
    base: str, method: tuple[str, ...], layout: tuple[str, ...]
) -> None:
    """The same global batch on 2 ranks: the one-process losses and weights (adapters included)."""
    one = _finetune(0, 1, base, method)
    got = run_distributed(_finetune, 2, base, method + layout, timeout=240, all_ranks=True, reuse=True)
    assert got[-1]["losses"]  # under pipeline parallelism only the last stage sees the loss
    for rank in got:
        if rank["losses"]:
            torch.testing.assert_close(
                torch.tensor(rank["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6
            )
        for name, value in rank["params"].items():
            torch.testing.assert_close(value, one["params"][name], rtol=1e-4, atol=1e-6, msg=name)
            # PyTorch's tensor-parallel styles re-create some parameters: the base must stay frozen.
            assert rank["info"][name][1] == (".adapter." in name), name


def _sharded_dtypes(rank: int, world: int, base: str) -> dict[str, tuple[str, bool, bool, bool]]:
    return _finetune(
        rank,
        world,
        base,
        ("mixed_precision=bf16_mixed", "ddp.use_distributed_optimizer=true", "train.train_iters=1"),
    )["info"]


@pytest.mark.distributed
def test_sharded_frozen_base_is_stored_in_16_bits(base: str) -> None:
    # FSDP keeps float32 shards as the optimizer's masters: only the adapters need them.
    for name, (dtype, trainable, _, stepped) in run_distributed(
        _sharded_dtypes, 2, base, timeout=240
    ).items():
        adapter = ".adapter." in name
        assert dtype == ("torch.float32" if adapter else "torch.bfloat16"), name
        assert trainable == stepped == adapter, name


def test_an_unset_tokenizer_follows_a_viaduct_base(base: str, tmp_path: Path) -> None:
    # The base was trained with the NullTokenizer of VOCAB: a fine-tuning config that names no
    # tokenizer takes it (a Hugging Face base gives its own; see test_hf_checkpoints).
    cfg = tiny_pretrain_config(
        "train.train_iters=1", "train.eval_iters=0", "peft=lora", f"checkpoint.pretrained_checkpoint={base}"
    )
    cfg.tokenizer = TokenizerConfig()
    cfg.validate()
    assert (cfg.tokenizer.tokenizer_type, cfg.tokenizer.vocab_size) == ("NullTokenizer", 256)
    assert "pretrained_checkpoint" in cfg.tokenizer.source_of("tokenizer_type")
    finetune(cfg)
