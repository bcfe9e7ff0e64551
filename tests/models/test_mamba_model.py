"""Mamba-2 and hybrid models: the provider (defaults, pattern rules, Megatron Bridge YAML), the model
(published sizes, meta-device build, causality, learning) and training through `pretrain()` (end to
end, bitwise resume, FSDP on two processes, what the loop refuses)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from viaduct.config import ConfigError
from viaduct.distributed.pipeline_split import pipeline_stages
from viaduct.models import (
    GPTModelProvider,
    HybridModelProvider,
    MambaModelProvider,
    MambaModelProvider1P3B,
    MambaModelProvider2P7B,
    MambaModelProvider130M,
    MambaModelProvider370M,
    MambaModelProvider780M,
    ModelProvider,
    NVIDIAMambaHybridModelProvider8B,
    NVIDIAMambaModelProvider8B,
)
from viaduct.models.accounting import estimate_memory, flops_per_token, num_parameters
from viaduct.models.mamba import Mamba2Mixer
from viaduct.models.mamba.model import AttentionLayer, MambaLayer, MambaModel, MLPLayer
from viaduct.models.mamba.provider import pattern_from_ratios
from viaduct.testing import run_distributed, tiny_pretrain_config
from viaduct.training.callbacks import CallbackContext
from viaduct.training.config import ConfigContainer
from viaduct.training.pretrain import pretrain


def tiny(
    pattern: str | None = "M*M-", cls: type[HybridModelProvider] = MambaModelProvider, **kw: Any
) -> HybridModelProvider:
    """A small float32 model: 64 wide, 8 Mamba heads of 16 in 2 groups, state 16, chunks of 8."""
    args: dict[str, Any] = dict(
        hybrid_layer_pattern=pattern,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        mamba_num_groups=2,
        mamba_head_dim=16,
        mamba_state_dim=16,
        mamba_chunk_size=8,
        seq_length=32,
        vocab_size=97,
        params_dtype="float32",
        bf16=False,
        make_vocab_size_divisible_by=64,
    )
    args.update(kw)
    return cls(**args)


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {p.path: f"{p.message} | fix: {p.fix}" for p in exc.value.problems}


# ---------------------------------------------------------------------- provider


def test_defaults_are_megatron_bridges() -> None:
    p = MambaModelProvider()
    assert isinstance(p, HybridModelProvider) and isinstance(p, GPTModelProvider)
    assert p.params_dtype == torch.bfloat16 and p.bf16 and not p.fp16
    assert p.num_layers is None and p.num_attention_heads == 1
    assert (p.mamba_num_groups, p.mamba_chunk_size, p.mamba_state_dim, p.mamba_head_dim) == (8, 128, 128, 64)
    assert p.mamba_num_heads is None
    assert p.hybrid_attention_ratio == p.hybrid_mlp_ratio == 0.0
    assert p.hybrid_layer_pattern is None and p.hybrid_override_pattern is None
    assert p.seq_length == 8192 and p.position_embedding_type == "none"
    assert p.normalization == "RMSNorm" and not p.add_bias_linear and not p.gated_linear_unit
    assert p.hidden_dropout == p.attention_dropout == 0.0
    assert not p.share_embeddings_and_output_weights


def test_num_layers_comes_from_the_pattern_and_must_agree() -> None:
    p = tiny("M*M-")
    p.finalize()
    assert p.num_layers == 4 and "hybrid_layer_pattern" in p.source_of("num_layers")
    p.hybrid_layer_pattern = "MM"
    p.finalize()  # a derived value follows the pattern
    assert p.num_layers == 2
    with pytest.raises(ConfigError) as exc:
        tiny("M*M-", num_layers=3).finalize()
    assert "num_layers" in _problems(exc) and "4 layers" in _problems(exc)["num_layers"]
    tiny("M*M-", num_layers=4).finalize()


def test_no_pattern_means_all_mamba_layers_and_needs_num_layers() -> None:
    p = tiny(None, num_layers=3)
    p.finalize()
    assert p.layer_pattern() == "MMM"
    with pytest.raises(ConfigError) as exc:
        tiny(None).finalize()
    assert "num_layers" in _problems(exc)


def test_ratios_place_the_layers_as_megatron_does() -> None:
    # Worked by hand from Megatron's rule: 8 layers, 2 attention (runs of 6 / 3 = 2 Mamba layers,
    # Mamba first and last), then 2 MLP over the remaining 6 Mamba layers (runs of 4 / 2 = 2, the last
    # ending with an MLP layer).
    assert pattern_from_ratios(8, 0.25, 0.25) == "MM*-M*M-"
    # 10 layers, 1 attention: two runs of 4.5 Mamba layers, the first rounding down.
    assert pattern_from_ratios(10, 0.1, 0.0) == "MMMMM*MMMM"
    assert pattern_from_ratios(5, 0.0, 0.0) == "MMMMM"
    p = tiny(None, num_layers=8, hybrid_attention_ratio=0.25, hybrid_mlp_ratio=0.25)
    p.finalize()
    assert p.layer_pattern() == "MM*-M*M-"
    model = p.provide(device="cpu")
    assert [type(layer) for layer in model.decoder.layers][2:4] == [AttentionLayer, MLPLayer]
    with pytest.raises(ConfigError) as exc:
        tiny(None, num_layers=4, hybrid_attention_ratio=0.75, hybrid_mlp_ratio=0.5).finalize()
    assert "at most 1" in _problems(exc)["hybrid_mlp_ratio"]
    with pytest.raises(ConfigError) as exc:
        tiny(None, num_layers=4, hybrid_attention_ratio=-0.1).finalize()
    assert "between 0 and 1" in _problems(exc)["hybrid_attention_ratio"]
    # A pattern overrides the ratios, with a warning when they disagree.
    with pytest.warns(UserWarning, match="hybrid_attention_ratio=0.5 is ignored"):
        tiny("M*M-", hybrid_attention_ratio=0.5).finalize()


def test_pattern_problems_name_every_symbol_and_the_fix_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        tiny("MEM|M*/M-x", mamba_chunk_size=0).finalize()
    text = str(exc.value)
    for symbol, fix in (
        ("'E'", "replace 'E' by '-'"),
        ("'/'", "remove the '/'"),
    ):
        assert symbol in text and fix in text
    assert "unknown layer symbol 'x'" in text and "M (Mamba), * (attention), - (MLP)" in text
    assert "'|'" not in text  # a stage boundary, no layer: fine
    assert "mamba_chunk_size" in _problems(exc)
    assert len(exc.value.problems) == 4


def test_deprecated_pattern_name_moves_and_both_names_conflict() -> None:
    p = tiny(None, hybrid_override_pattern="MM*")
    with pytest.warns(DeprecationWarning, match="hybrid_layer_pattern"):
        p.finalize()
    assert (p.hybrid_layer_pattern, p.hybrid_override_pattern, p.num_layers) == ("MM*", None, 3)
    with pytest.raises(ConfigError) as exc:
        tiny("MM", hybrid_override_pattern="MM").finalize()
    assert "hybrid_override_pattern" in _problems(exc)


def test_mamba_head_rules() -> None:
    with pytest.raises(ConfigError) as exc:
        tiny(mamba_num_groups=3).finalize()
    assert "mamba_num_groups" in _problems(exc)
    with pytest.raises(ConfigError) as exc:
        tiny(mamba_head_dim=48).finalize()
    assert "mamba_head_dim" in _problems(exc)
    p = tiny(mamba_num_heads=4, mamba_num_groups=4)
    p.finalize()
    assert p.mamba_heads() == 4


def test_context_parallelism_needs_whole_groups_per_rank() -> None:
    tiny("M*M-", MambaModelProvider, context_parallel_size=2).finalize()  # 2 groups over 2 ranks
    with pytest.raises(ConfigError) as exc:
        tiny("M*M-", MambaModelProvider, context_parallel_size=4).finalize()
    message = _problems(exc)["context_parallel_size"]
    assert "2 groups (model.mamba_num_groups) cannot be split evenly over 4" in message
    with pytest.raises(ConfigError) as exc:
        tiny("M*M-", MambaModelProvider, context_parallel_size=2, tensor_model_parallel_size=2).finalize()
    message = _problems(exc)["context_parallel_size"]
    assert "(tensor_model_parallel_size=2 × context_parallel_size=2)" in message
    tiny("M*M-", context_parallel_size=2, tensor_model_parallel_size=2, mamba_num_groups=4).finalize()
    tiny("*-", MambaModelProvider, context_parallel_size=4).finalize()  # no Mamba layer: GPT's rules


def test_stage_boundaries_in_the_pattern_split_the_pipeline() -> None:
    p = tiny("M*M | -M", pipeline_model_parallel_size=2)
    p.finalize()
    assert p.num_layers == 5 and p.layer_pattern() == "M*M-M"
    assert p.pipeline_layout() == ("Ettt|ttL", "hybrid_layer_pattern")
    assert [s.layers for s in pipeline_stages(p)] == [(0, 1, 2), (3, 4)]
    stage = p.provide(pp_rank=1, device="cpu", init_seed=0)
    assert stage.decoder.layers.global_indices == (3, 4) and stage.embedding is None
    assert isinstance(stage.decoder.layers["3"], MLPLayer)
    # Without pipeline parallelism the whole model is one stage: a pattern trained with boundaries
    # also builds in one process.
    whole = tiny("M*M|-M")
    whole.finalize()
    assert [s.layers for s in pipeline_stages(whole)] == [(0, 1, 2, 3, 4)]


def test_stage_boundary_problems_name_the_pattern() -> None:
    with pytest.raises(ConfigError) as exc:
        tiny("M|*|M-", pipeline_model_parallel_size=2).finalize()
    assert (
        "cut it into 3 slices, not a multiple of pipeline_model_parallel_size (2)"
        in _problems(exc)["hybrid_layer_pattern"]
    )
    with pytest.raises(ConfigError) as exc:
        tiny("M*|M-", pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|ttL").finalize()
    assert "both place the layers" in _problems(exc)["pipeline_model_parallel_layout"]
    with pytest.raises(ConfigError) as exc:
        tiny("M*|M-", pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1).finalize()
    assert (
        "cannot be combined with hybrid_layer_pattern" in _problems(exc)["num_layers_in_first_pipeline_stage"]
    )


def test_tensor_parallel_splits_whole_groups() -> None:
    # 2 groups split over 4 ranks: refused with the rule and the fix; over 2 ranks: fine.
    cfg = _config("M*M-", "model.tensor_model_parallel_size=4", "model.num_attention_heads=4")
    with pytest.raises(ConfigError, match="whole B/C groups") as exc:
        cfg.validate(world_size=4)
    assert "divides mamba_num_groups" in str(exc.value)
    _config("M*M-", "model.tensor_model_parallel_size=2", "model.sequence_parallel=true").validate(
        world_size=2
    )
    # An all-Mamba model is not held to the (unused) attention heads' rule.
    _config(None, "model.tensor_model_parallel_size=2", "model.num_attention_heads=1").validate(world_size=2)


@pytest.mark.parametrize(
    "target",
    [
        "megatron.bridge.models.mamba.mamba_provider.MambaModelProvider",
        "megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider",
        "megatron.bridge.models.MambaModelProvider",
    ],
)
def test_megatron_bridge_targets_load(target: str) -> None:
    data = tiny().to_dict()
    data["_target_"] = target
    loaded = ModelProvider.from_dict(data)
    assert isinstance(loaded, HybridModelProvider)
    assert type(loaded).__name__ == target.rsplit(".", 1)[1]
    assert loaded.hybrid_layer_pattern == "M*M-"


def test_bridge_yaml_with_the_deprecated_pattern_name_loads(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(
        "_target_: megatron.bridge.models.mamba.mamba_provider.MambaModelProvider130M\n"
        "hybrid_override_pattern: MMMM\nhybrid_layer_pattern: null\nnum_layers: 4\nvocab_size: 100\n"
    )
    p = ModelProvider.from_yaml(path)
    assert type(p) is MambaModelProvider130M
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        p.finalize()
    assert p.layer_pattern() == "MMMM"


@pytest.mark.parametrize("cls", [MambaModelProvider, HybridModelProvider, NVIDIAMambaHybridModelProvider8B])
def test_yaml_round_trip(cls: type[MambaModelProvider], tmp_path: Path) -> None:
    p = cls(vocab_size=1000) if cls is NVIDIAMambaHybridModelProvider8B else tiny(cls=cls)
    path = tmp_path / "model.yaml"
    p.to_yaml(path)
    back = ModelProvider.from_yaml(path)
    assert type(back) is type(p) and back == p
    back.finalize()


def test_short_names_select_the_family() -> None:
    assert ModelProvider.variant("mamba") is MambaModelProvider
    assert ModelProvider.variant("hybrid") is HybridModelProvider
    assert ModelProvider.variant("MambaModelProvider130M") is MambaModelProvider130M


# ---------------------------------------------------------------------- sizes


# Parameter counts of the published checkpoints' layout (Hugging Face state-spaces/mamba2-*: tied
# embeddings, the 50277-token vocabulary padded to 50288), computed by hand from the module shapes:
# per layer norm h + in_proj h(2d + 2n + heads) + conv (d + 2n) x 5 + 3 heads + gated norm d +
# out_proj d h (d = 2h, n = state 128, one group, heads = d / 64), plus the table and the final norm.
def _published_mamba2(layers: int, h: int, vocab: int = 50288) -> int:
    d, n = 2 * h, 128
    heads = d // 64
    layer = h + h * (2 * d + 2 * n + heads) + (d + 2 * n) * 5 + 3 * heads + d + d * h
    return layers * layer + vocab * h + h


PUBLISHED = [
    # class, nominal size of the published model, exact count of its layout
    (MambaModelProvider130M, 130e6, _published_mamba2(24, 768)),
    (MambaModelProvider370M, 370e6, _published_mamba2(48, 1024)),
    (MambaModelProvider780M, 780e6, _published_mamba2(48, 1536)),
    (MambaModelProvider1P3B, 1.3e9, _published_mamba2(48, 2048)),
    (MambaModelProvider2P7B, 2.7e9, _published_mamba2(64, 2560)),
]


@pytest.mark.parametrize(("cls", "nominal", "exact"), PUBLISHED, ids=[c.__name__ for c, _, _ in PUBLISHED])
def test_published_mamba2_sizes(cls: type[MambaModelProvider], nominal: float, exact: int) -> None:
    p = cls(vocab_size=50277, should_pad_vocab=True, share_embeddings_and_output_weights=True)
    assert p.padded_vocab_size() == 50288
    assert num_parameters(p) == exact
    assert abs(exact - nominal) / nominal < 0.04  # 128.99M, 368.3M, 780.2M, 1.344B, 2.703B
    model = p.provide(device="meta")
    assert sum(t.numel() for t in model.parameters()) == exact


def test_mamba2_130m_exact_count() -> None:
    # Mamba2-130m: 128,989,632 parameters (tied), about 129M.
    p = MambaModelProvider130M(
        vocab_size=50277, should_pad_vocab=True, share_embeddings_and_output_weights=True
    )
    assert num_parameters(p) == 128_989_632
    untied = MambaModelProvider130M(vocab_size=50277, should_pad_vocab=True)
    assert num_parameters(untied) == 128_989_632 + 50288 * 768


@pytest.mark.parametrize(
    ("cls", "billions", "kinds"),
    [(NVIDIAMambaModelProvider8B, 8.24, (56, 0, 0)), (NVIDIAMambaHybridModelProvider8B, 8.66, (24, 4, 28))],
)
def test_nvidia_8b_sizes(cls: type[MambaModelProvider], billions: float, kinds: tuple[int, int, int]) -> None:
    p = cls(vocab_size=256000)
    p.finalize()
    pattern = p.layer_pattern()
    assert (pattern.count("M"), pattern.count("*"), pattern.count("-")) == kinds
    n = num_parameters(p)
    assert abs(n / 1e9 - billions) < 0.02 * billions
    model = p.provide(device="meta")
    assert sum(t.numel() for t in model.parameters()) == n
    kinds_built = [type(layer) for layer in model.decoder.layers]
    assert kinds_built.count(MambaLayer) == kinds[0] and kinds_built.count(AttentionLayer) == kinds[1]
    assert kinds_built.count(MLPLayer) == kinds[2]


def test_flops_per_token_counts_matmuls_scan_and_attention() -> None:
    p = tiny("M*M-", seq_length=32)
    p.finalize()
    h, d, heads, groups, n, q = 64, 128, 8, 2, 16, 8
    in_out = d + (d + 2 * groups * n) + heads
    matmul = 2 * (in_out * h + d * h) + (3 * 64 * h + 64 * h) + 2 * 128 * h + 97 * h
    scan = 2 * q * (groups * n + heads * 16) + 4 * heads * 16 * n + 2 * (d + 2 * groups * n) * 4
    attention = 12 * 1 * 4 * 16 * 32
    assert flops_per_token(p) == 6 * matmul + 2 * 3 * scan + attention
    assert flops_per_token(p, causal=True) == 6 * matmul + 2 * 3 * scan + attention / 2


def test_memory_estimate_covers_mamba_models_and_their_pipeline_ranks() -> None:
    # The estimates themselves are checked in tests/models/test_family_memory.py.
    assert estimate_memory(tiny(), micro_batch_size=1).activations > 0
    from viaduct.distributed.layout import ParallelLayout
    from viaduct.models.accounting import estimate_pipeline_memory

    ranks = estimate_pipeline_memory(
        tiny(pipeline_model_parallel_size=2), 1, layout=ParallelLayout(world_size=2, pp=2)
    )
    assert [(e.pipeline_rank, e.layers) for e in ranks] == [(0, 2), (1, 2)]


# ---------------------------------------------------------------------- model


def test_meta_build_then_init_equals_a_direct_build() -> None:
    p = tiny()
    direct = p.provide(device="cpu", init_seed=7)
    meta = p.provide(device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights(7)
    a, b = direct.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    mixer = direct.decoder.layers["0"].mixer
    other = direct.decoder.layers["2"].mixer
    assert isinstance(mixer, Mamba2Mixer) and isinstance(other, Mamba2Mixer)
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert bool((mixer.A_log.exp() >= 1).all()) and bool((mixer.A_log.exp() <= 16).all())
    out_std = mixer.out_proj.weight.std().item()
    assert math.isclose(out_std, 0.02 / math.sqrt(8), rel_tol=0.15)
    # Each layer draws from its own generator: two mixers differ.
    assert not torch.equal(mixer.in_proj.weight, other.in_proj.weight)


def test_model_names_and_layer_kinds() -> None:
    model = tiny("M*M-").provide(device="meta")
    assert isinstance(model, MambaModel)
    assert [type(layer) for layer in model.decoder.layers] == [
        MambaLayer,
        AttentionLayer,
        MambaLayer,
        MLPLayer,
    ]
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.mixer.in_proj.weight" in names and "decoder.layers.0.norm.weight" in names
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in names
    assert "decoder.layers.3.mlp.linear_fc1.weight" in names
    assert {
        "embedding.word_embeddings.weight",
        "decoder.final_layernorm.weight",
        "output_layer.weight",
    } <= names


def test_whole_hybrid_model_is_causal() -> None:
    torch.manual_seed(0)
    model = tiny("M*M-", params_dtype="float32").provide(device="cpu", init_seed=1).double()
    x = torch.randint(0, 97, (2, 30))
    y = x.clone()
    y[:, 17:] = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :17], b[:, :17], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = tiny("M*M-").provide(device="cpu", init_seed=3)
    x = torch.randint(0, 97, (4, 32))
    labels = torch.roll(x, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(x, labels=labels).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first is not None and loss.item() < 0.1 * first


def test_full_recompute_gives_the_same_gradients() -> None:
    plain = tiny("M*M-").provide(device="cpu", init_seed=5)
    p = tiny("M*M-", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    recomputed = p.provide(device="cpu", init_seed=5)
    x = torch.randint(0, 97, (2, 32))
    for m in (plain, recomputed):
        m(x, labels=x).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---------------------------------------------------------------------- training


def _config(pattern: str | None, *overrides: str) -> ConfigContainer:
    """The tiny pretraining config with a Mamba / hybrid model in place of its GPT one."""
    cfg = tiny_pretrain_config()
    cfg.model = tiny(pattern, num_layers=None if pattern else 2, vocab_size=None)
    if overrides:
        from viaduct.config import apply_overrides

        apply_overrides(cfg, list(overrides))
    return cfg


def _run(pattern: str | None, *overrides: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses: list[float] = []
    weights: dict[str, torch.Tensor] = {}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            losses.append(float(ctx.metrics["losses"]["lm loss"]))

    def train_end(ctx: CallbackContext) -> None:
        assert ctx.model is not None
        weights.update({k: v.detach().clone() for k, v in ctx.model.state_dict().items()})

    pretrain(
        _config(pattern, *overrides), callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}]
    )
    return losses, weights


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [None, "M*M-"], ids=["mamba", "hybrid"])
def test_pretrain_runs_end_to_end(pattern: str | None) -> None:
    losses, weights = _run(pattern, "train.train_iters=8", "train.eval_iters=1", "optimizer.lr=3e-3")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert any(".mixer.A_log" in k for k in weights)


@pytest.mark.slow
def test_checkpoint_resume_is_bitwise(tmp_path: Path) -> None:
    common = ("train.train_iters=6", "train.eval_iters=0", "dataset.num_workers=0")
    straight, straight_weights = _run("M*M-", *common)
    save = tmp_path / "ckpt"
    first, _ = _run("M*M-", *common, "train.exit_interval=3", f"checkpoint.save={save}")
    second, weights = _run("M*M-", *common, f"checkpoint.save={save}", f"checkpoint.load={save}")
    assert len(first) == 3 and len(second) == 3
    assert first + second == straight
    assert weights.keys() == straight_weights.keys()
    for name, value in straight_weights.items():
        assert torch.equal(weights[name], value), name
    # The checkpoint loads back as the same kind of model.
    from viaduct.inference import load_checkpoint

    loaded = load_checkpoint(save, device="cpu").model
    assert isinstance(loaded, MambaModel) and loaded.decoder.layers.global_indices == (0, 1, 2, 3)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()


def _train(rank: int, world: int, overrides: tuple[str, ...]) -> dict[str, Any]:
    """A 3-step hybrid run: its losses and every parameter at the end (gathered)."""
    out: dict[str, Any] = {"losses": []}

    def step_end(ctx: CallbackContext) -> None:
        if ctx.metrics["losses"]:
            out["losses"].append(float(ctx.metrics["losses"]["lm loss"]))

    def train_end(ctx: CallbackContext) -> None:
        assert ctx.model is not None
        out["params"] = {
            n.replace("module.", "").replace("_orig_mod.", ""): _full(p)
            for n, p in ctx.model.named_parameters()
        }
        out["sharded"] = any(isinstance(p, DTensor) for p in ctx.model.parameters())

    # A vocabulary already padded for 2 tensor-parallel ranks: padding rows enter the softmax (as in
    # Megatron), so one process must have the same rows.
    common = ("train.train_iters=3", "train.eval_iters=0", "optimizer.lr=3e-3", "model.vocab_size=384")
    cfg = _config("M*M-", *common, *overrides)
    pretrain(cfg, callbacks=[{"on_train_step_end": step_end, "on_train_end": train_end}])
    return out


def _assert_same_run(got: list[dict[str, Any]], one: dict[str, Any], atol: float = 1e-6) -> None:
    """Every rank's losses and (gathered) final weights equal the one-process run's."""
    for rank in got:
        torch.testing.assert_close(
            torch.tensor(rank["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6
        )
        assert rank["params"].keys() == one["params"].keys()
        for name, value in rank["params"].items():
            torch.testing.assert_close(value, one["params"][name], rtol=1e-4, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        (),
        ("ddp.use_distributed_optimizer=true",),
        ("model.tensor_model_parallel_size=2",),
        ("model.tensor_model_parallel_size=2", "model.sequence_parallel=true"),
        ("model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "train.torch_compile=true"),
        ("model.context_parallel_size=2",),
        ("model.context_parallel_size=2", "train.torch_compile=true"),
    ],
    ids=["ddp", "fsdp", "tp", "tp-sp", "tp-sp-compiled", "cp", "cp-compiled"],
)
def test_two_ranks_match_one_process(layout: tuple[str, ...]) -> None:
    one = _train(0, 1, ())
    got = run_distributed(_train, 2, layout, timeout=240, all_ranks=True, reuse=True)
    # FSDP2 (over the data- and context-parallel ranks) or TP made DTensors, of the Mamba layers too.
    assert all(rank["sharded"] == bool(layout) for rank in got)
    _assert_same_run(got, one)


def _layers(params: dict[str, torch.Tensor]) -> list[int]:
    """The global indices of the layers whose parameters these are."""
    return sorted(
        {int(n.split("decoder.layers.")[1].split(".")[0]) for n in params if "decoder.layers." in n}
    )


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        (),  # 2 + 2 layers
        ("model.hybrid_layer_pattern='M*M|-'",),  # stage boundaries in the pattern: 3 + 1 layers
        ("model.hybrid_layer_pattern='M|*|M|-'",),  # 4 slices: 2 virtual stages per rank, interleaved
        ("model.share_embeddings_and_output_weights=true",),  # the last stage's copy of the table
    ],
    ids=["even", "pattern-boundaries", "pattern-virtual-stages", "tied"],
)
def test_pipeline_stages_match_one_process(layout: tuple[str, ...], request: pytest.FixtureRequest) -> None:
    # The boundaries only split the pattern: one process trains the same "M*M-" model.
    one = _train(0, 1, tuple(o for o in layout if "share_embeddings" in o))
    got = run_distributed(
        _train, 2, ("model.pipeline_model_parallel_size=2", *layout), timeout=240, all_ranks=True, reuse=True
    )
    first, last = got
    held = {
        "even": ([0, 1], [2, 3]),
        "pattern-boundaries": ([0, 1, 2], [3]),
        "pattern-virtual-stages": ([0, 2], [1, 3]),
        "tied": ([0, 1], [2, 3]),
    }[request.node.callspec.id]
    assert (_layers(first["params"]), _layers(last["params"])) == held
    assert not first["losses"]  # only the last stage computes the loss
    torch.testing.assert_close(
        torch.tensor(last["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6
    )
    assert set(first["params"]).isdisjoint(last["params"]) or "share_embeddings" in str(layout)
    merged = {**first["params"], **last["params"]}
    assert merged.keys() == one["params"].keys()
    for name, value in merged.items():
        torch.testing.assert_close(value, one["params"][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_checkpoint_loads_in_one_process(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    layout = (
        "model.pipeline_model_parallel_size=2",
        "model.hybrid_layer_pattern='M*M|-'",
        f"checkpoint.save={save}",
    )
    first, last = run_distributed(_train, 2, layout, timeout=240, all_ranks=True, reuse=True)
    from viaduct.inference import load_checkpoint

    loaded = load_checkpoint(save, device="cpu").model
    assert isinstance(loaded, MambaModel) and loaded.decoder.layers.global_indices == (0, 1, 2, 3)
    trained = {**first["params"], **last["params"]}
    for name, value in loaded.named_parameters():
        torch.testing.assert_close(value.detach(), trained[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_biased_projections_under_tensor_parallelism_match_one_process() -> None:
    # out_proj's bias is whole on every rank and must enter the reduced output once.
    bias = ("model.add_bias_linear=true",)
    one = _train(0, 1, bias)
    layout = (*bias, "model.tensor_model_parallel_size=2", "model.sequence_parallel=true")
    _assert_same_run(run_distributed(_train, 2, layout, timeout=240, all_ranks=True, reuse=True), one)


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_and_context_parallel_together_match_one_process() -> None:
    # 4 groups: 2 per tensor-parallel rank, 1 per context-parallel rank of each.
    groups = ("model.mamba_num_groups=4",)
    one = _train(0, 1, groups)
    layout = (
        *groups,
        "model.tensor_model_parallel_size=2",
        "model.sequence_parallel=true",
        "model.context_parallel_size=2",
    )
    got = run_distributed(_train, 4, layout, timeout=300, all_ranks=True, reuse=True)
    # Four ranks sum a gradient in another order; Adam scales an element whose gradient is near zero
    # up to a whole step, so a few such elements differ by ~1e-5.
    _assert_same_run(got, one, atol=3e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_with_sharded_data_parallel_matches_one_process() -> None:
    # 4 ranks: Mamba groups and attention heads over 2 tensor-parallel ranks, FSDP over the other 2.
    one = _train(0, 1, ())
    layout = ("model.tensor_model_parallel_size=2", "model.sequence_parallel=true")
    got = run_distributed(
        _train, 4, (*layout, "ddp.use_distributed_optimizer=true"), timeout=300, all_ranks=True, reuse=True
    )
    _assert_same_run(got, one)


def _init_split_on_meta(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Build on the meta device, split over 2 tensor-parallel ranks, then allocate and initialize
    (what init_model_with_meta_device does on GPUs): every mixer parameter, gathered whole."""
    from torch.distributed.device_mesh import init_device_mesh

    from viaduct.distributed.parallelize import apply_tensor_parallel

    provider = tiny("M*M-", vocab_size=128, init_model_with_meta_device=True)
    model = provider.provide()
    assert all(p.is_meta for p in model.parameters())
    apply_tensor_parallel(model, init_device_mesh("cpu", (world,)), sequence_parallel=False)
    model.to_empty(device="cpu")
    model.init_weights(5)
    return {n: _full(p) for n, p in model.named_parameters() if ".mixer." in n}


@pytest.mark.slow
@pytest.mark.distributed
def test_meta_device_build_initializes_split_mixers() -> None:
    got = run_distributed(_init_split_on_meta, 2, timeout=120)
    p = tiny("M*M-")
    dt = F.softplus(got["decoder.layers.0.mixer.dt_bias"])
    assert dt.shape == (8,) and ((dt > 0.001 - 1e-6) & (dt < 0.1 + 1e-6)).all()
    a = torch.exp(got["decoder.layers.2.mixer.A_log"])
    assert ((a >= 1.0) & (a <= 16.0)).all()
    assert torch.equal(got["decoder.layers.0.mixer.D"], torch.ones(8))
    w = got["decoder.layers.0.mixer.in_proj.weight"]
    assert abs(w.std().item() - p.init_method_std) < 0.2 * p.init_method_std
    assert all(torch.isfinite(t).all() for t in got.values())


# ---------------------------------------------------------------------- recipes, CLI, export


@pytest.mark.parametrize(("name", "layers"), [("mamba2_130m", 24), ("mamba2_hybrid_8b", 56)])
def test_recipes_validate(name: str, layers: int) -> None:
    from viaduct.recipes import get_recipe

    cfg = get_recipe(name)()
    cfg.validate(world_size=8)
    assert isinstance(cfg.model, MambaModelProvider) and cfg.model.num_layers == layers
    assert cfg.dataset.seq_length == cfg.model.seq_length


def test_cli_validate_prints_the_memory_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    from viaduct.cli.main import run

    assert run(["config", "validate", "--recipe", "mamba2_130m", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU (estimate): parameters" in out and "not estimated" not in out
    assert "configuration is valid" in out


def test_a_hybrid_hugging_face_copy_validates_unless_nemotron_h_cannot_hold_it() -> None:
    cfg = _config("M*M-", "checkpoint.also_save_hf_checkpoint=true", "checkpoint.save=/nonexistent/ckpt")
    cfg.validate()  # written as a NemotronHForCausalLM (tests/models/conversion/test_nemotron_h_hf.py)
    cfg.model.gated_linear_unit = True
    with pytest.raises(ConfigError, match="Nemotron-H's MLP layers are not gated"):
        cfg.validate()


def test_per_layer_compile_covers_every_layer_and_matches_eager() -> None:
    """`compile_model(scope="layers")` (what FSDP runs use) compiles Mamba, attention and MLP layers,
    not only transformer layers, with the eager model's loss."""
    from viaduct.models.compile import compile_model

    torch._dynamo.reset()
    eager = tiny().provide(device="cpu", init_seed=3)
    compiled = tiny().provide(device="cpu", init_seed=3)
    compile_model(compiled, "layers", backend="aot_eager")
    layers = list(compiled.decoder.layers)
    assert {type(layer) for layer in layers} == {MambaLayer, AttentionLayer, MLPLayer}
    assert all(layer._compiled_call_impl is not None for layer in layers)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled(x, labels=x), eager(x, labels=x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
