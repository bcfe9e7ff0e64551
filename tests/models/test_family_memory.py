"""The Mamba / hybrid and T5 memory estimates (viaduct.models.family_memory) against what the layers
really keep: the bytes of the distinct storages autograd saves for backward during one forward on
the CPU (`saved_bytes`), in float32 and bfloat16.

Where the CPU's kernels keep other tensors than CUDA's, the difference is added to the formula here,
by name: the CPU's composite RMSNorm keeps a float32 copy of its input and the normalized values
(CUDA's fused one: the input and rstd), and the CPU's layer norm keeps its statistics in the input's
dtype (CUDA: float32; a few bytes per token, inside the tolerance). Dropout is off (CUDA keeps bool
masks, the CPU masks in the compute dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.distributed.layout import ParallelLayout
from viaduct.models.accounting import (
    _mamba_sizes,
    estimate_config_memory,
    estimate_memory,
    estimate_pipeline_memory,
    num_parameters,
)
from viaduct.models.family_memory import (
    attention_layer_bytes,
    mamba_layer_bytes,
    mamba_scan_recompute_bytes,
    mixer_kernels_run,
    mlp_layer_bytes,
    stack_activations,
    t5_decoder_layer_bytes,
    t5_encoder_layer_bytes,
    t5_mask_bytes,
)
from viaduct.models.mamba.model import AttentionLayer, MambaLayer, MLPLayer
from viaduct.models.mamba.provider import HybridModelProvider
from viaduct.models.mamba.ssd import ssd_backend, ssd_chunked
from viaduct.models.t5.model import _additive_mask
from viaduct.models.t5.provider import T5ModelProvider, t5_provider_num_parameters
from viaduct.testing.kernels import HAS_TRITON, INTERPRET

B, S, H = 2, 32, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_bytes(fn: Callable[[], torch.Tensor], params: list[torch.Tensor], *, skip: tuple = ()) -> int:
    """Bytes of the distinct non-parameter storages saved for backward while `fn()` runs forward
    (`skip`: tensors not to count, e.g. shared inputs counted elsewhere)."""
    ignored = {t.untyped_storage().data_ptr() for t in [*params, *skip]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in ignored:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()  # the graph was real
    return sum(seen.values())


def cpu_rms_norm_extra(normalization: str, a: int, h: int = H) -> int:
    """Bytes per token the CPU's composite RMSNorm keeps beyond CUDA's fused kernel (input + rstd):
    the normalized values in float32, and in 16 bits a float32 copy of the input instead of it."""
    if normalization != "RMSNorm":
        return 0
    return 4 * h + (4 * h - a * h if a < 4 else 0)


def cpu_layer_norm_stats(normalization: str, a: int, rows: int) -> int:
    """Bytes per token the CPU's layer norm keeps beyond CUDA's for `rows` normalized rows: its mean
    and rstd in the input's dtype (CUDA: float32), so fewer in 16 bits."""
    return -(8 - 2 * a) * rows if normalization == "LayerNorm" and a < 4 else 0


def hybrid(dtype: str = "fp32", **kw: object) -> HybridModelProvider:
    base: dict[str, object] = dict(
        hybrid_layer_pattern="M*-",
        hidden_size=H,
        num_attention_heads=4,
        vocab_size=128,
        seq_length=S,
        mamba_state_dim=16,
        mamba_head_dim=16,
        mamba_num_groups=2,
        mamba_chunk_size=8,
        params_dtype=dtype,
    )
    base.update(kw)
    p = HybridModelProvider(**base)  # type: ignore[arg-type]
    p.finalize()
    return p


def layer_saved(layer: torch.nn.Module, dtype: torch.dtype, compiled: bool = False, seq: int = S) -> int:
    torch.manual_seed(0)
    x = torch.randn(B, seq, H, dtype=dtype, requires_grad=True)
    run = torch.compile(layer, backend="aot_eager_decomp_partition", fullgraph=True) if compiled else layer
    return saved_bytes(lambda: run(x), list(layer.parameters()))


# ---------------------------------------------------------------------------------------- hybrid layers


@pytest.mark.parametrize("groups", [1, 2], ids=["1-group", "2-groups"])
@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_layer_keeps_what_the_formula_says(dtype: str, norm: str, groups: int) -> None:
    # One group: the mixer's per-group split of in_proj's output gives views (the conv keeps in_proj's
    # output whole); several: copies of x B C, x and z.
    p = hybrid(dtype, normalization=norm, mamba_num_groups=groups)
    a = DTYPES[dtype].itemsize
    measured = layer_saved(MambaLayer(p, 1, dtype=DTYPES[dtype]), DTYPES[dtype])
    expected = B * S * (mamba_layer_bytes(p, a, S, compiled=False) + cpu_rms_norm_extra(norm, a))
    assert measured == pytest.approx(expected, rel=0.02)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs Triton and TRITON_INTERPRET=1 on the CPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("groups", [1, 2], ids=["1-group", "2-groups"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_layer_on_the_kernel_path_keeps_what_the_formula_says(
    dtype: str, groups: int, compiled: bool
) -> None:
    # The fused kernels (a CUDA run's path; here under Triton's interpreter) keep their inputs only:
    # no shifted copies, no float32 chain, y in the compute dtype.
    p = hybrid(dtype, normalization="RMSNorm", mamba_num_groups=groups, mamba_chunk_size=16)
    d = DTYPES[dtype]
    assert mixer_kernels_run(p, d.itemsize)
    with ssd_backend("triton"):
        measured = layer_saved(MambaLayer(p, 1, dtype=d), d, compiled=compiled)
    extra = 0 if compiled else cpu_rms_norm_extra("RMSNorm", d.itemsize)  # compiled: CUDA's norm
    expected = B * S * (mamba_layer_bytes(p, d.itemsize, S, compiled=compiled) + extra)
    assert measured == pytest.approx(expected, rel=0.02)
    torch_path = B * S * (mamba_layer_bytes(p, d.itemsize, S, compiled=compiled, kernels=False) + extra)
    assert expected < 0.8 * torch_path


def test_estimate_takes_the_kernel_path_where_its_shapes_fit() -> None:
    # The estimate is for a CUDA run: Mamba-2 780M's shape in bf16 takes the kernels (less kept, no
    # [chunk, chunk] transient); a chunk they do not take, or float64, keeps the PyTorch path's.
    p = hybrid("bf16", mamba_chunk_size=128, mamba_head_dim=64, mamba_state_dim=128, seq_length=256)
    assert mixer_kernels_run(p, 2) and mixer_kernels_run(p, 4) and not mixer_kernels_run(p, 8)
    assert mamba_layer_bytes(p, 2, 256) < mamba_layer_bytes(p, 2, 256, kernels=False)
    scan = mamba_scan_recompute_bytes(p, 2, 4, 256)
    assert scan < mamba_scan_recompute_bytes(p, 2, 4, 256, kernels=False) / 2
    odd = replace(p, mamba_chunk_size=96)
    assert not mixer_kernels_run(odd, 2)
    assert mamba_layer_bytes(odd, 2, 256) == mamba_layer_bytes(odd, 2, 256, kernels=False)


@pytest.mark.parametrize("seq", [S, 20], ids=["whole-chunks", "padded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_layer_keeps_no_scan_intermediates(dtype: str, seq: int) -> None:
    # The scan's intermediates are many times its inputs; the checkpoint in the mixer drops them, so
    # what the layer keeps is far below the scan's own saved tensors plus the rest. Its inputs come
    # as the mixer gives them: x, B and C in the compute dtype (the matmuls' operands then), dt in
    # float32.
    d = DTYPES[dtype]
    p = hybrid(dtype, normalization="LayerNorm", seq_length=seq)
    _, heads, _ = _mamba_sizes(p)
    x = torch.randn(B, seq, heads, p.mamba_head_dim, dtype=d, requires_grad=True)
    dt = torch.rand(B, seq, heads, requires_grad=True)
    A = -torch.rand(heads, requires_grad=True)
    G, N = p.mamba_num_groups, p.mamba_state_dim
    Bm, Cm = (torch.randn(B, seq, G, N, dtype=d, requires_grad=True) for _ in range(2))
    scan = saved_bytes(
        lambda: ssd_chunked(x, dt, A, Bm, Cm, p.mamba_chunk_size)[0], [], skip=(x, dt, A, Bm, Cm)
    )
    # The transient the estimate adds for the one layer whose scan backward recomputes (exact but
    # for the scan's few bool masks).
    assert mamba_scan_recompute_bytes(p, d.itemsize, B, seq) == pytest.approx(scan, rel=0.005)
    layer = layer_saved(MambaLayer(p, 1, dtype=d), d, seq=seq)
    assert layer == pytest.approx(B * seq * mamba_layer_bytes(p, d.itemsize, seq, compiled=False), rel=0.02)
    assert scan > layer / 2  # what the checkpoint keeps out of the layer's saved tensors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw",
    [
        dict(normalization="LayerNorm"),
        dict(normalization="RMSNorm"),
        dict(normalization="LayerNorm", position_embedding_type="rope"),
        dict(normalization="LayerNorm", qk_layernorm=True),
    ],
    ids=["layernorm", "rmsnorm", "rope", "qk-norm"],
)
def test_attention_layer_keeps_what_the_formula_says(dtype: str, kw: dict) -> None:
    p = hybrid(dtype, **kw)
    a = DTYPES[dtype].itemsize
    layer = AttentionLayer(p, 1, dtype=DTYPES[dtype])
    rope = None
    if p.position_embedding_type == "rope":
        from viaduct.models.common.rotary import RotaryEmbedding

        rope = RotaryEmbedding(16, S)(S)
    torch.manual_seed(0)
    x = torch.randn(B, S, H, dtype=DTYPES[dtype], requires_grad=True)
    skip = tuple(rope) if rope is not None else ()
    measured = saved_bytes(lambda: layer(x, rope), list(layer.parameters()), skip=skip)
    expected = attention_layer_bytes(p, a) + cpu_rms_norm_extra(p.normalization, a)
    if p.qk_layernorm:  # a norm row per query head and key group
        rows = p.num_attention_heads + (p.num_query_groups or p.num_attention_heads)
        expected += cpu_layer_norm_stats(p.normalization, a, rows)
    assert measured == pytest.approx(B * S * expected, rel=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_mlp_layer_keeps_what_the_formula_says(dtype: str, gated: bool) -> None:
    kw = dict(gated_linear_unit=True, activation_func="silu") if gated else {}
    p = hybrid(dtype, normalization="LayerNorm", **kw)
    measured = layer_saved(MLPLayer(p, 1, dtype=DTYPES[dtype]), DTYPES[dtype])
    expected = B * S * mlp_layer_bytes(p, DTYPES[dtype].itemsize, compiled=False)
    assert measured == pytest.approx(expected, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2], ids=["1-group", "2-groups"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_layers_keep_what_the_formula_says(dtype: str, groups: int) -> None:
    # torch.compile's partitioner (the one inductor uses, without generating code) recomputes most of
    # the Mamba mixer's float32 elementwise chain (not the conv's shifted copies: it does not
    # recompute a padding), and a gated MLP's act(gate).
    a = DTYPES[dtype].itemsize
    p = hybrid(
        dtype,
        normalization="LayerNorm",
        gated_linear_unit=True,
        activation_func="silu",
        mamba_num_groups=groups,
    )
    mamba = layer_saved(MambaLayer(p, 1, dtype=DTYPES[dtype]), DTYPES[dtype], compiled=True)
    assert mamba == pytest.approx(B * S * mamba_layer_bytes(p, a, S, compiled=True), rel=0.02)
    assert mamba < B * S * mamba_layer_bytes(p, a, S, compiled=False)
    mlp = layer_saved(MLPLayer(p, 1, dtype=DTYPES[dtype]), DTYPES[dtype], compiled=True)
    assert mlp == pytest.approx(B * S * mlp_layer_bytes(p, a, compiled=True), rel=0.02)


@pytest.mark.parametrize(
    "recompute",
    [
        {},
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
        dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    ],
    ids=["none", "uniform-2", "block-2"],
)
def test_hybrid_stack_keeps_what_the_formula_says(recompute: dict) -> None:
    # The whole layer stack with its final norm, under the block's full recompute.
    p = hybrid("bf16", normalization="LayerNorm", hybrid_layer_pattern="M*-M", **recompute)
    model = p.provide()
    torch.manual_seed(0)
    x = torch.randn(B, S, H, dtype=torch.bfloat16, requires_grad=True)
    measured = saved_bytes(lambda: model.decoder(x), list(model.parameters()))
    layers = [
        {
            "M": mamba_layer_bytes(p, 2, S, False),
            "*": attention_layer_bytes(p, 2),
            "-": mlp_layer_bytes(p, 2),
        }[k]
        for k in p.layer_pattern()
    ]
    kept, peak = stack_activations(layers, 2 * H, p)
    # The final norm's input and statistics (bf16 on the CPU); its output is kept by the output
    # layer's GEMM in the model, by nothing here.
    final_norm = 2 * H + 4
    assert measured == pytest.approx(B * S * (kept + final_norm), rel=0.02)
    if recompute:
        # The chunk redone in backward comes on top of the kept inputs (block: the layers kept whole
        # are freed by then, so their activations can be the peak).
        assert kept <= peak < sum(layers)
        assert kept < peak or recompute["recompute_method"] == "block"


def test_hybrid_model_estimate_parts() -> None:
    p = hybrid("bf16")
    n = num_parameters(p)
    est = estimate_memory(p, 2, compiled=False)
    assert (est.parameters, est.gradients, est.optimizer, est.gathered_weights) == (2 * n, 4 * n, 12 * n, 0)
    layers = sum(
        {
            "M": mamba_layer_bytes(p, 2, S, False),
            "*": attention_layer_bytes(p, 2),
            "-": mlp_layer_bytes(p, 2),
        }[k]
        for k in p.layer_pattern()
    )
    tokens = 2 * S
    expected = tokens * (layers + 2 * 2 * H + 4 + 8) + mamba_scan_recompute_bytes(p, 2, 2, S)
    assert est.activations == expected
    assert estimate_memory(p, 2).activations < est.activations  # compiled keeps less
    assert estimate_memory(p, 4, compiled=False).activations > 1.9 * est.activations


def _rank_share(mixer: torch.nn.Module, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """The mixer's parameters a tensor-parallel rank holds (its whole B/C groups: contiguous row
    blocks of in_proj, conv1d, the per-head and norm weights; out_proj's input columns), as views."""
    share = {}
    for name, param in mixer.named_parameters():
        dim = 1 if name == "out_proj.weight" else 0
        size = param.shape[dim] // tp
        share[name] = param.narrow(dim, rank * size, size)
    return share


@pytest.mark.parametrize("groups", [2, 4], ids=["1-group-a-rank", "2-groups-a-rank"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba_layer_on_a_tensor_parallel_rank_keeps_what_the_formula_says(dtype: str, groups: int) -> None:
    # What one of two tensor-parallel ranks runs (without sequence parallelism): the norm on the whole
    # (replicated) input, the mixer on its half of the groups, its partial out_proj sum into the
    # residual (the all-reduce keeps nothing).
    d = DTYPES[dtype]
    p = hybrid(dtype, normalization="RMSNorm", mamba_num_groups=groups)
    layer = MambaLayer(p, 1, dtype=d)
    share = _rank_share(layer.mixer, 2, 1)
    torch.manual_seed(0)
    x = torch.randn(B, S, H, dtype=d, requires_grad=True)
    measured = saved_bytes(lambda: x + layer.mixer.mix(layer.norm(x), share), list(layer.parameters()))
    rank = mamba_layer_bytes(p, d.itemsize, S, compiled=False, layout=ParallelLayout(world_size=2, tp=2))
    assert measured == pytest.approx(B * S * (rank + cpu_rms_norm_extra("RMSNorm", d.itemsize)), rel=0.02)
    # The mixer's part is halved; the norm's is not.
    assert measured < 0.6 * layer_saved(layer, d)


def test_hybrid_estimate_under_tensor_and_sequence_parallelism() -> None:
    # h 64, Mamba: d_inner 128, 8 heads of 16, 4 groups of state 16 (conv channels c = 128 + 2 x 4 x
    # 16 = 256, in_proj out 128 + 256 + 8 = 392); attention: 4 heads of 16; MLP: 256 units; RMSNorm,
    # no biases, untied output, vocabulary 256 (a multiple of 128 x 2: the same padded size at tp 2).
    p = hybrid("bf16", hybrid_layer_pattern="M*-M", mamba_num_groups=4, vocab_size=256)
    h, d_inner, c, heads, vocab, ffn = H, 128, 256, 8, 256, 256
    mamba_split = h * (d_inner + c + heads) + (4 * c + c) + 3 * heads + d_inner + d_inner * h
    attention_split, mlp_split = h * 3 * h + h * h, 2 * h * ffn
    root_split, norm = 2 * vocab * h, h  # token table and output layer; each norm's weight
    whole = 2 * mamba_split + attention_split + mlp_split + root_split + 5 * norm
    assert whole == num_parameters(p)
    # Each rank: half of every split part, every norm (and no bias) whole.
    rank = (2 * mamba_split + attention_split + mlp_split + root_split) // 2 + 5 * norm

    tokens, a = B * S, 2
    stream = a * h + 4  # a norm's input and its rstd: split under sequence parallelism
    gemm_in = a * h  # its output, the next GEMM's input: whole on each rank (gathered under SP)
    mamba_inner = mamba_layer_bytes(p, a, S, compiled=False) - stream - gemm_in  # calibrated above
    attention_inner = (3 * h + h) * a + 4 * 4  # q k v, the kernel's output, log-sum-exp per head
    mlp_inner = 2 * ffn * a  # fc1's output, the activation's output
    scan = mamba_scan_recompute_bytes(p, a, B, S)  # in heads and groups: halved on each rank

    def activations(tp: int, sp: bool) -> float:
        s = tp if sp else 1
        layers = 4 * stream / s + 4 * gemm_in + (2 * mamba_inner + attention_inner + mlp_inner) / tp
        final_norm, token_ids = stream / s + gemm_in, 8  # its output is kept whole by the output layer
        return tokens * (layers + final_norm + token_ids) + scan / tp

    one = estimate_memory(p, B, compiled=False)
    assert (one.parameters, one.activations) == (2 * whole, activations(1, False))
    for sp in (False, True):
        layout = ParallelLayout(world_size=2, tp=2, sequence_parallel=sp)
        est = estimate_memory(p, B, layout=layout, num_microbatches=1, compiled=False)
        # Tensor parallelism always runs FSDP2: float32 weights (one data-parallel rank: no sharding).
        assert est.parameters == 4 * rank and est.gradients == 4 * rank and est.optimizer == 8 * rank
        assert est.parameters / one.parameters == pytest.approx(2 * rank / whole)
        assert est.activations / one.activations == pytest.approx(
            activations(2, sp) / activations(1, False), rel=1e-3
        )
        assert est.logits < one.logits  # half the vocabulary a rank
    no_sp = estimate_memory(p, B, layout=ParallelLayout(world_size=2, tp=2), compiled=False).activations
    assert 0.5 * one.activations < no_sp < 0.65 * one.activations


def test_fsdp_shards_a_hybrid_model_and_gathers_two_layers() -> None:
    p = hybrid("bf16", hybrid_layer_pattern="M*-M")
    n = num_parameters(p)
    layout = ParallelLayout(world_size=4, dp_shard=4, strategy="optim_grads_params")
    est = estimate_memory(p, 1, layout=layout, num_microbatches=1)
    shard = -(-n // 4)
    assert (est.parameters, est.gradients, est.optimizer) == (4 * shard, 4 * shard, 8 * shard)
    assert 0 < est.gathered_weights < 2 * n


def test_pipeline_ranks_of_a_hybrid_model_share_its_parts() -> None:
    # Stage boundaries in the pattern: rank 0 holds the embedding and 4 layers, rank 1 the other 3,
    # the final norm, the output layer and the loss. 1f1b: rank 0 keeps 2 micro-batches in flight.
    whole = estimate_memory(hybrid(hybrid_layer_pattern="MM*-|M-M"), 2)
    p = hybrid(hybrid_layer_pattern="MM*-|M-M", pipeline_model_parallel_size=2)
    first, last = estimate_pipeline_memory(
        p, 2, layout=ParallelLayout(world_size=2, pp=2), num_microbatches=4
    )
    assert (first.pipeline_rank, first.layers, last.pipeline_rank, last.layers) == (0, 4, 1, 3)
    assert first.parameters + last.parameters == whole.parameters  # every weight once (untied)
    assert first.optimizer + last.optimizer == whole.optimizer
    assert first.logits == 0 and last.logits == whole.logits
    assert last.activations < whole.activations < first.activations  # two passes in flight on rank 0
    assert estimate_memory(p, 2, layout=ParallelLayout(world_size=2, pp=2), num_microbatches=4) == max(
        first, last, key=lambda e: e.total
    )
    # Tied embeddings: the last stage holds its own copy of the token table.
    tied = dict(hybrid_layer_pattern="MM*-|M-M", share_embeddings_and_output_weights=True)
    whole_tied = estimate_memory(hybrid(**tied), 2)
    a, b = estimate_pipeline_memory(
        hybrid(**tied, pipeline_model_parallel_size=2), 2, layout=ParallelLayout(world_size=2, pp=2)
    )
    assert a.parameters + b.parameters == whole_tied.parameters + 128 * H * 4  # one more float32 table


def test_t5_pipeline_and_context_parallel_estimates_are_refused_clearly() -> None:
    p = hybrid()
    with pytest.raises(ConfigError, match="pipeline parallelism is not built for T5 models"):
        estimate_pipeline_memory(t5(), 1, layout=ParallelLayout(world_size=2, pp=2))
    with pytest.raises(ConfigError, match="context parallelism is not built for T5") as err:
        estimate_memory(t5(), 1, layout=ParallelLayout(world_size=4, tp=2, cp=2))
    assert "model.context_parallel_size" in str(err.value)
    # A hybrid under context parallelism: each rank's share of the sequence.
    whole, half = estimate_memory(p, 2), estimate_memory(p, 2, layout=ParallelLayout(world_size=2, cp=2))
    assert half.logits < whole.logits
    assert whole.activations // 2 - 64 <= half.activations <= whole.activations // 2 + 64
    with pytest.raises(ConfigError, match="PEFT is not built"):
        estimate_memory(t5(), 1, trainable=10)
    # A hybrid's PEFT estimate: the base frozen (no gradients, no optimizer state), the adapters trained.
    full, adapted = estimate_memory(p, 1), estimate_memory(p, 1, trainable=10)
    assert adapted.gradients == 10 * 4 and adapted.optimizer == 10 * 8
    assert adapted.parameters == full.parameters + 10 * 4 and adapted.activations == full.activations


# ---------------------------------------------------------------------------------------------- T5

ENC, DEC = 32, 16


def t5(dtype: str = "fp32", **kw: object) -> T5ModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=H,
        num_attention_heads=4,
        ffn_hidden_size=256,
        vocab_size=128,
        seq_length=ENC,
        seq_length_dec=DEC,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
    )
    base.update(kw)
    return T5ModelProvider(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw", [{}, dict(gated_linear_unit=True, activation_func="gelu")], ids=["gelu", "geglu"]
)
def test_t5_encoder_layer_keeps_what_the_formula_says(dtype: str, kw: dict) -> None:
    p = t5(dtype, **kw)
    model, cfg, d = p.provide(), p.t5_spec().layer_config(2), DTYPES[dtype]
    keep = torch.ones(B, 1, 1, ENC, dtype=torch.bool)
    mask = _additive_mask(keep, None, d, torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(B, ENC, H, dtype=d, requires_grad=True)
    layer = model.encoder.layers[0]
    measured = saved_bytes(lambda: layer(x, None, mask), list(model.parameters()), skip=(mask,))
    expected = B * ENC * t5_encoder_layer_bytes(cfg, d.itemsize, compiled=False)
    assert measured == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_t5_decoder_layer_keeps_what_the_formula_says(dtype: str) -> None:
    p = t5(dtype)
    model, cfg, d = p.provide(), p.t5_spec().layer_config(2), DTYPES[dtype]
    cpu = torch.device("cpu")
    causal = torch.ones(DEC, DEC, dtype=torch.bool).tril() & torch.ones(B, 1, 1, DEC, dtype=torch.bool)
    self_mask = _additive_mask(causal, None, d, cpu)
    cross_mask = _additive_mask(torch.ones(B, 1, 1, ENC, dtype=torch.bool), None, d, cpu)
    torch.manual_seed(0)
    y = torch.randn(B, DEC, H, dtype=d, requires_grad=True)
    context = torch.randn(B, ENC, H, dtype=d, requires_grad=True)  # kept once for all decoder layers
    layer = model.decoder.layers[0]
    measured = saved_bytes(
        lambda: layer(y, context, None, self_mask, cross_mask),
        list(model.parameters()),
        skip=(context, self_mask, cross_mask),
    )
    per_dec, per_enc = t5_decoder_layer_bytes(cfg, d.itemsize)
    assert measured == pytest.approx(B * DEC * per_dec + B * ENC * per_enc, rel=0.02)


T5_RECOMPUTE = {
    "none": {},
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective-mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
}


@pytest.mark.parametrize("recompute", T5_RECOMPUTE.values(), ids=T5_RECOMPUTE.keys())
def test_t5_recompute_keeps_what_the_estimate_says(recompute: dict) -> None:
    # What a forward keeps is the estimate less the layer a full uniform recompute redoes in backward:
    # the decoder's last (its backward runs first), or the encoder's last once the decoder's kept
    # chunk inputs are gone, whichever is more (block: the kept layers are gone by then).
    p = t5("bf16", **recompute)
    model = p.provide()
    enc, dec = torch.randint(0, 128, (B, ENC)), torch.randint(0, 128, (B, DEC))
    masks = (torch.ones(B, ENC, dtype=torch.bool), torch.ones(B, DEC, dtype=torch.bool))
    measured = saved_bytes(lambda: model(enc, dec, masks[0], masks[1], masks[0]), list(model.parameters()))
    est = estimate_memory(p, B, compiled=False).activations
    cfg = p.t5_spec().layer_config(2)
    per_dec, per_enc = t5_decoder_layer_bytes(cfg, 2, compiled=False)
    decoder_layer = B * DEC * per_dec + B * ENC * per_enc
    encoder_layer = B * ENC * t5_encoder_layer_bytes(cfg, 2, compiled=False)
    decoder_inputs = 2 * B * DEC * 2 * H
    redone = max(decoder_layer, encoder_layer - decoder_inputs)
    redone = redone if recompute.get("recompute_method") == "uniform" else 0
    assert measured == pytest.approx(est - redone, rel=0.03)
    if recompute:
        assert est < estimate_memory(t5("bf16"), B, compiled=False).activations


@pytest.mark.parametrize("position", ["learned_absolute", "rope"])
def test_t5_model_keeps_what_the_estimate_says(position: str) -> None:
    # The whole model (embeddings, both stacks, masks, final norms) with the training step's padding
    # masks; the logits' GEMM keeps only its input, so the loss path is left out. (Relative position
    # bias is not compared here: a mask that needs a gradient sends the CPU's attention down its
    # math path, which keeps the float32 scores and probabilities; CUDA's memory-efficient kernel
    # keeps the bias mask, which `t5_mask_bytes` counts.)
    p = t5("bf16", position_embedding_type=position)
    model = p.provide()
    enc = torch.randint(0, 128, (B, ENC))
    dec = torch.randint(0, 128, (B, DEC))
    masks = (torch.ones(B, ENC, dtype=torch.bool), torch.ones(B, DEC, dtype=torch.bool))
    measured = saved_bytes(lambda: model(enc, dec, masks[0], masks[1], masks[0]), list(model.parameters()))
    est = estimate_memory(p, B, compiled=False)
    assert measured == pytest.approx(est.activations, rel=0.03)


def test_t5_estimate_parts_and_recompute() -> None:
    p = t5("bf16")
    n = t5_provider_num_parameters(p)
    est = estimate_memory(p, 4)
    assert (est.parameters, est.gradients, est.optimizer) == (2 * n, 4 * n, 12 * n)
    assert est.logits > 0 and est.activations > 0
    # The decoder's length counts; the encoder's more (it has more tokens and every cross-attention
    # keeps keys and values over them).
    longer_dec = estimate_memory(t5("bf16", seq_length_dec=32), 4).activations
    longer_enc = estimate_memory(t5("bf16", seq_length=64), 4).activations
    assert est.activations < longer_dec < longer_enc
    # Full recompute, counted as GPT's (chunk inputs plus one chunk redone), keeps less.
    cfg = p.t5_spec().layer_config(2)
    layers = [t5_encoder_layer_bytes(cfg, 2)] * 4
    full = replace(cfg, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kept, peak = stack_activations(layers, 2 * H, full)
    assert kept == 4 * 2 * H and peak == 4 * 2 * H + layers[0]
    # Without pipeline parallelism, one rank: the whole model (pipeline parallelism is refused above).
    assert estimate_pipeline_memory(p, 1, layout=ParallelLayout(world_size=1)) == [estimate_memory(p, 1)]


def test_t5_estimate_under_tensor_and_sequence_parallelism() -> None:
    # h 64, 4 heads of 16 (inner 64), MLP 256 units, LayerNorm, biases, learned positions (64),
    # vocabulary 256 (a multiple of 128 x 2), tied embeddings with the output bias; 2 + 2 layers.
    p = t5("bf16", vocab_size=256)
    h, inner, ffn, vocab, norm = H, 64, 256, 256, 2 * H

    def column(n_in: int, n_out: int) -> int:  # weight and bias, both split
        return n_in * n_out + n_out

    self_attention = column(h, 3 * inner) + inner * h
    mlp = column(h, ffn) + ffn * h
    cross = column(h, inner) + column(h, 2 * inner) + inner * h
    encoder_split, decoder_split = self_attention + mlp, self_attention + cross + mlp
    encoder_whole, decoder_whole = 2 * norm + 2 * h, 3 * norm + 3 * h  # norms, row-parallel biases
    root_split = vocab * h + 64 * h + vocab  # token table, position table, tied output bias
    split = 2 * encoder_split + 2 * decoder_split + root_split
    replicated = 2 * encoder_whole + 2 * decoder_whole + 2 * norm  # with the two final norms
    assert split + replicated == t5_provider_num_parameters(p)
    rank = split // 2 + replicated

    a, enc, dec = 2, B * ENC, B * DEC
    stream = a * h + 8  # a norm's input, LayerNorm's mean and rstd: split under SP
    gemm_in = a * h  # its output, the next GEMM's input: whole on each rank (gathered under SP)
    attention = (3 * inner + inner) * a + 4 * 4  # q k v, the kernel's output, log-sum-exp per head
    mlp_inner = 2 * ffn * a  # fc1's output, the activation's output (compiled: the same, not gated)
    cross_q = 2 * inner * a + 4 * 4  # per decoder token: q, the kernel's output, log-sum-exp
    cross_kv = 2 * inner * a  # per encoder token: the key/value projection's output
    masks = B * ENC * a + B * DEC * DEC * a + B * ENC * a  # replicated

    def activations(tp: int, sp: bool) -> float:
        s = tp if sp else 1
        encoder_layer = 2 * stream / s + 2 * gemm_in + (attention + mlp_inner) / tp
        decoder_layer = 3 * stream / s + 3 * gemm_in + (attention + mlp_inner + cross_q) / tp
        # Under SP each decoder layer's key/value projection keeps its own gathered encoder output.
        cross_enc = cross_kv / tp + (a * h if sp else 0)
        layers = 2 * enc * encoder_layer + 2 * (dec * decoder_layer + enc * cross_enc)
        per_token = stream / s + gemm_in + 8  # the final norms; the embedding's token ids
        return layers + per_token * (enc + dec) + masks

    one = estimate_memory(p, B)
    assert (one.parameters, one.activations) == (2 * (split + replicated), activations(1, False))
    for sp in (False, True):
        est = estimate_memory(
            p,
            B,
            layout=ParallelLayout(
                world_size=4, tp=2, dp_shard=2, strategy="optim_grads_params", sequence_parallel=sp
            ),
        )
        shard = -(-rank // 2)  # FSDP2 over the two data-parallel ranks
        assert (est.parameters, est.optimizer) == (4 * shard, 8 * shard)
        assert est.parameters / one.parameters == pytest.approx(2 * shard / (split + replicated))
        assert est.activations / one.activations == pytest.approx(
            activations(2, sp) / activations(1, False), rel=1e-3
        )
        assert est.logits < one.logits
    # Without sequence parallelism the residual stream stays whole, so a rank keeps more.
    no_sp = estimate_memory(p, B, layout=ParallelLayout(world_size=2, tp=2)).activations
    with_sp = estimate_memory(
        p, B, layout=ParallelLayout(world_size=2, tp=2, sequence_parallel=True)
    ).activations
    assert 0.5 * one.activations < with_sp < no_sp < one.activations
    # Relative position bias: the masks carry it per head, a rank's heads only; the bucket indices
    # (int64 [seq, seq] per stack) and the cross-attention mask stay whole.
    rel = t5("bf16", position_embedding_type="relative")
    per_head = B * 4 * (ENC * ENC + DEC * DEC) * a
    whole = 8 * (ENC * ENC + DEC * DEC) + B * ENC * a
    assert t5_mask_bytes(rel, a, B, ENC, DEC) == per_head + whole
    assert (
        t5_mask_bytes(rel, a, B, ENC, DEC, layout=ParallelLayout(world_size=2, tp=2)) == per_head // 2 + whole
    )


# ------------------------------------------------------------------------------------- configurations


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        ("mamba2_130m", ["model.seq_length=2048", "train.micro_batch_size=4", "train.global_batch_size=16"]),
        (
            "t5_220m",
            ["model.seq_length=512", "model.vocab_size=4196", "train.micro_batch_size=32"],
        ),
    ],
)
def test_recipes_get_an_estimate(recipe: str, overrides: list[str]) -> None:
    from viaduct.config import apply_overrides
    from viaduct.recipes import get_recipe

    cfg = get_recipe(recipe)()
    apply_overrides(cfg, [*overrides, "train.global_batch_size=128"])
    cfg.validate(world_size=1)
    est = estimate_config_memory(cfg)
    assert 1 << 30 < est.total < 80 << 30
    cfg.train.torch_compile = False  # eager keeps more of a Mamba layer
    eager = estimate_config_memory(cfg)
    assert eager.activations >= est.activations


def test_cli_validate_prints_the_t5_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    from viaduct.cli.main import run

    args = ["config", "validate", "--recipe", "t5_220m", "--world-size", "1", "model.vocab_size=4196"]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "memory per GPU (estimate): parameters 0.38" in out and "not estimated" not in out


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp-sp"])
def test_cli_validate_prints_the_tensor_parallel_t5_estimate(
    capsys: pytest.CaptureFixture[str], sequence_parallel: bool
) -> None:
    from viaduct.cli.main import run

    args = ["config", "validate", "--recipe", "t5_220m", "model.tensor_model_parallel_size=2"]
    args += ["model.vocab_size=32128", f"model.sequence_parallel={str(sequence_parallel).lower()}"]
    assert run([*args, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU (estimate): parameters" in out and "not estimated" not in out
    assert "tp 2" in out


@pytest.mark.slow
def test_pretrain_bench_reports_the_t5_estimate_next_to_the_run() -> None:
    # What bench/families_bench.py runs on a GPU (where it also reports the peak), at a CPU-sized shape.
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "pretrain_bench.py"
    command = [sys.executable, str(bench), "--recipe=t5_220m", "--seq=64", "--mbs=1", "--gbs=1"]
    command += ["--warmup=1", "--steps=1", "--log-interval=1", "--estimate", "dataset=mock_t5"]
    command += ["model.num_layers=1", "model.encoder_num_layers=1", "model.seq_length_dec=32"]
    command += ["scheduler.lr_warmup_fraction=null", "scheduler.lr_warmup_iters=0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    result = json.loads(lines[-1])
    assert isinstance(result["estimate_gib"], float) and result["estimate_gib"] > 0
