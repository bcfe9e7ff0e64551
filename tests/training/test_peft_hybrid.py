"""LoRA fine-tuning of Mamba-2 / hybrid models: adapters on the Mamba mixers' in_proj and out_proj as
well as on the attention and MLP layers, trained through `finetune()` from a pretrained hybrid, alone
and on 2 gloo ranks (FSDP, pipeline stages) with the one-process result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from viaduct.inference import load_checkpoint
from viaduct.models.mamba import HybridModelProvider
from viaduct.peft.adapters import AdaptedLinear
from viaduct.testing import run_distributed, tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.checkpoint.inspect import inspect_checkpoint
from viaduct.training.config import ConfigContainer
from viaduct.training.pretrain import finetune, pretrain

# Megatron Bridge's LoRA targets for its Nemotron-H recipes: every linear layer of every layer kind.
TARGETS = "peft.target_modules=['in_proj','out_proj','linear_qkv','linear_proj','linear_fc1','linear_fc2']"
VOCAB = ("tokenizer.tokenizer_type=NullTokenizer", "tokenizer.vocab_size=256")


def _config(*overrides: str) -> ConfigContainer:
    cfg = tiny_pretrain_config(*VOCAB)
    cfg.model = HybridModelProvider(
        hybrid_layer_pattern="M*M-", hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        mamba_num_groups=2, mamba_head_dim=16, mamba_state_dim=16, mamba_chunk_size=8, seq_length=32,
        params_dtype="float32", bf16=False, make_vocab_size_divisible_by=64,
    )  # fmt: skip
    from viaduct.config import apply_overrides

    apply_overrides(cfg, list(overrides))
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("base") / "ckpt"
    pretrain(_config("train.train_iters=2", "train.eval_iters=0", f"checkpoint.save={root}"))
    return str(root)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def _finetune(rank: int, world: int, base: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"losses": []}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            out["losses"].append(float(ctx.metrics["losses"]["lm loss"]))

    def train_end(ctx: CallbackContext) -> None:
        assert ctx.model is not None
        named = {
            n.replace("module.", "").replace("_orig_mod.", ""): p for n, p in ctx.model.named_parameters()
        }
        out["params"] = {n: _full(p) for n, p in named.items()}
        out["trainable"] = {n for n, p in named.items() if p.requires_grad}
        out["adapted"] = sorted(n for n, m in ctx.model.named_modules() if isinstance(m, AdaptedLinear))

    cfg = _config(
        "train.train_iters=3", "train.eval_iters=0", "peft=lora", "peft.dim=4", "peft.alpha=8",
        "optimizer.lr=0.01", f"checkpoint.pretrained_checkpoint={base}", TARGETS, *overrides,
    )  # fmt: skip
    finetune(cfg, callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}])
    return out


@pytest.mark.slow
def test_lora_on_every_layer_kind_trains_only_the_adapters(base: str, tmp_path: Path) -> None:
    save = tmp_path / "adapters"
    lora = _finetune(0, 1, base, (f"checkpoint.save={save}",))
    full: list[float] = []
    finetune(
        _config("train.train_iters=1", "train.eval_iters=0", f"checkpoint.pretrained_checkpoint={base}"),
        callbacks=[{"on_train_step_end": lambda ctx: full.append(float(ctx.metrics["losses"]["lm loss"]))}],
    )
    assert lora["losses"][0] == full[0]  # B = 0: the base model's function at the first step
    # Both Mamba layers' in_proj and out_proj, the attention layer's two, the MLP layer's two.
    assert [n.split("decoder.layers.")[1] for n in lora["adapted"]] == [
        "0.mixer.in_proj", "0.mixer.out_proj", "1.self_attention.linear_proj", "1.self_attention.linear_qkv",
        "2.mixer.in_proj", "2.mixer.out_proj", "3.mlp.linear_fc1", "3.mlp.linear_fc2",
    ]  # fmt: skip
    weights = {n: _full(p) for n, p in load_checkpoint(base, device="cpu").model.named_parameters()}
    for name, value in lora["params"].items():
        if ".adapter." in name:
            assert name in lora["trainable"]
            continue
        assert name not in lora["trainable"], name
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)  # untouched
    mixer_b = [v for n, v in lora["params"].items() if n.endswith("in_proj.adapter.linear_out.weight")]
    assert mixer_b and all(bool(v.abs().sum() > 0) for v in mixer_b)  # the mixers' adapters trained
    names = [t["name"] for t in inspect_checkpoint(save)["tensors"]]
    assert names and all(".adapter." in n for n in names)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("method", "layout"),
    [
        ((), ("ddp.use_distributed_optimizer=true",)),
        ((), ("model.pipeline_model_parallel_size=2",)),
        ((), ("model.tensor_model_parallel_size=2", "model.sequence_parallel=true")),
        (("peft=dora",), ("model.tensor_model_parallel_size=2",)),
    ],
    ids=["fsdp", "pp", "tp-sp", "dora-tp"],
)
def test_lora_on_a_hybrid_under_parallel_layouts_matches_one_process(
    base: str, method: tuple[str, ...], layout: tuple[str, ...]
) -> None:
    """The same global batch on 2 ranks: the one-process losses and weights, adapters included (under
    tensor parallelism the mixers' adapters split with their layers' groups)."""
    one = _finetune(0, 1, base, method)
    got = run_distributed(_finetune, 2, base, method + layout, timeout=240, all_ranks=True, reuse=True)
    losses = got[-1]["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    merged = {k: v for rank in got for k, v in rank["params"].items()}
    assert merged.keys() == one["params"].keys()
    for name, value in merged.items():
        # Adam scales an element whose gradient is near zero up to a whole step (lr 0.01): summed in
        # another order, a few such elements of 2,048 move by ~1e-5.
        torch.testing.assert_close(value, one["params"][name], rtol=1e-4, atol=3e-5, msg=name)
    for rank in got:  # the base stays frozen however the layout re-created its parameters
        assert rank["trainable"] == {n for n in rank["params"] if ".adapter." in n}
