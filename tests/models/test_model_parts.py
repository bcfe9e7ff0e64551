"""The building blocks in viaduct.models.common: rotary embeddings, activations, norms, the sliding
window mask, the chunked linear cross entropy, and the row layouts of the fused QKV and gated fc1
weights (equal to the old layouts after the checkpoint upgrade's permutation; tensor-parallel shards)."""

from __future__ import annotations

import math
from copy import deepcopy as copy_module

import pytest
import torch
import torch.nn.functional as F

from viaduct.models import AttnBackend, GPTModelProvider
from viaduct.models.common.activations import fast_gelu, quick_gelu, squared_relu
from viaduct.models.common.attention import SelfAttention, sliding_window_mask
from viaduct.models.common.loss import (
    IGNORE_INDEX,
    cross_entropy,
    default_chunk_tokens,
    linear_cross_entropy,
)
from viaduct.models.common.norms import Norm
from viaduct.models.common.rotary import (
    LLAMA3_HIGH_FREQ_FACTOR,
    LLAMA3_LOW_FREQ_FACTOR,
    LLAMA3_ORIGINAL_CONTEXT,
    RotaryEmbedding,
    apply_rotary,
    inverse_frequencies,
    llama3_scale_frequencies,
)
from viaduct.training.checkpoint.upgrade import fc1_rows_v1_to_v2, inverse, qkv_rows_v1_to_v2

# ---------------------------------------------------------------------------------------------- rotary


def rotate_at(rope: RotaryEmbedding, x: torch.Tensor, pos: int) -> torch.Tensor:
    """x [head_dim] rotated to position `pos` (through the [batch, seq, heads, dim] API)."""
    cos, sin = rope(1, torch.tensor([[pos]]))
    return apply_rotary(x.view(1, 1, 1, -1), cos, sin, interleaved=rope.interleaved).view(-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rotary_dot_product_depends_only_on_relative_position(interleaved: bool, percent: float) -> None:
    rope = RotaryEmbedding(16, 128, percent=percent, interleaved=interleaved)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def dot(m: int, n: int) -> float:
        return float(rotate_at(rope, q, m) @ rotate_at(rope, k, n))

    for rel in (0, 3, 11):
        ref = dot(rel, 0)
        for offset in (1, 17, 90):
            assert dot(rel + offset, offset) == pytest.approx(ref, abs=1e-4)
    assert abs(dot(5, 0) - dot(6, 0)) > 1e-3  # the relative position does matter


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_rotates_the_documented_channel_pairs(interleaved: bool) -> None:
    d, pos, base = 8, 7, 10000.0
    rope = RotaryEmbedding(d, 16, base=base, interleaved=interleaved)
    x = torch.randn(d, dtype=torch.float64)
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if interleaved:  # pairs (0, 1), (2, 3), ...
        pairs = torch.complex(x[0::2], x[1::2]) * torch.exp(1j * theta)
        expected = torch.stack([pairs.real, pairs.imag], dim=-1).flatten()
    else:  # pairs (i, i + d/2)
        pairs = torch.complex(x[: d // 2], x[d // 2 :]) * torch.exp(1j * theta)
        expected = torch.cat([pairs.real, pairs.imag])
    out = rotate_at(rope, x, pos)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(rotate_at(rope, x, 0), x, rtol=1e-6, atol=1e-6)  # position 0: identity


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_the_other_channels_untouched(interleaved: bool) -> None:
    rope = RotaryEmbedding(16, 32, percent=0.5, interleaved=interleaved)
    assert rope.rot_dim == 8 and rope.cos.shape == (32, 8)
    x = torch.randn(2, 5, 3, 16)
    cos, sin = rope(5)
    out = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert out.shape == x.shape
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert torch.equal(out[:, 0], x[:, 0])  # position 0
    assert (out[:, 1:, :, :8] - x[:, 1:, :, :8]).abs().amax() > 1e-2
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rotary_tables_and_position_ids() -> None:
    rope = RotaryEmbedding(8, 20)
    cos, sin = rope(6)
    assert cos.shape == (6, 1, 8) and sin.shape == (6, 1, 8)
    pos = torch.tensor([[3, 4, 5], [10, 11, 12]])
    cos_p, sin_p = rope(3, pos)
    assert cos_p.shape == (2, 3, 1, 8)
    assert torch.equal(cos_p[0, :, 0], rope.cos[3:6]) and torch.equal(sin_p[1, :, 0], rope.sin[10:13])
    inv = inverse_frequencies(8, 10000.0)
    torch.testing.assert_close(rope.cos[5, :4], torch.cos(5 * inv))
    torch.testing.assert_close(rope.sin[5, 4:], torch.sin(5 * inv))


def test_inverse_frequencies() -> None:
    inv = inverse_frequencies(8, 10000.0)
    expected = torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])
    torch.testing.assert_close(inv, expected)
    assert inv.dtype == torch.float32


def test_llama3_scaling_keeps_high_and_divides_low_frequencies() -> None:
    factor = 8.0
    inv = inverse_frequencies(128, 500000.0)
    scaled = llama3_scale_frequencies(inv, factor)
    wavelen = 2 * math.pi / inv
    high = wavelen < LLAMA3_ORIGINAL_CONTEXT / LLAMA3_HIGH_FREQ_FACTOR
    low = wavelen > LLAMA3_ORIGINAL_CONTEXT / LLAMA3_LOW_FREQ_FACTOR
    medium = ~high & ~low
    assert high.sum() > 10 and low.sum() > 10 and medium.sum() > 0
    assert torch.equal(scaled[high], inv[high])
    torch.testing.assert_close(scaled[low], inv[low] / factor)
    assert ((scaled[medium] < inv[medium]) & (scaled[medium] > inv[medium] / factor)).all()
    assert (scaled[1:] <= scaled[:-1]).all()  # still decreasing: the ramp is smooth
    rope = RotaryEmbedding(128, 16, base=500000.0, llama3_scaling_factor=factor)
    torch.testing.assert_close(rope.cos[9, :64], torch.cos(9 * scaled))


def test_interpolation_divides_positions() -> None:
    plain = RotaryEmbedding(16, 64)
    interp = RotaryEmbedding(16, 64, interpolation_factor=4.0)
    torch.testing.assert_close(interp.cos[12], plain.cos[3])
    torch.testing.assert_close(interp.sin[40], plain.sin[10])


def test_rotary_on_meta_is_filled_by_reset_parameters() -> None:
    rope = RotaryEmbedding(16, 32, device="meta")
    assert rope.cos.is_meta
    rope.to_empty(device="cpu")
    rope.reset_parameters()
    ref = RotaryEmbedding(16, 32)
    assert torch.equal(rope.cos, ref.cos) and torch.equal(rope.sin, ref.sin)


# ---------------------------------------------------------------------------------------------- activations


def test_activation_formulas() -> None:
    x = torch.linspace(-5, 5, 201, dtype=torch.float64)
    torch.testing.assert_close(squared_relu(x), torch.where(x > 0, x * x, 0.0))
    c = math.sqrt(2 / math.pi)
    torch.testing.assert_close(fast_gelu(x), 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x**3))))
    torch.testing.assert_close(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)))
    # All three approximate / differ from the exact GELU.
    assert (fast_gelu(x) - F.gelu(x)).abs().max() < 1e-3
    assert (quick_gelu(x) - F.gelu(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- norms


def test_norm_formulas_and_zero_centered_gamma() -> None:
    x = torch.randn(4, 10, dtype=torch.float64) * 2 + 0.5
    gamma = torch.rand(10, dtype=torch.float64) + 0.5
    beta = torch.randn(10, dtype=torch.float64)

    rms = Norm(10, "RMSNorm", 1e-6, dtype=torch.float64)
    assert rms.bias is None and (rms.weight == 1).all()
    rms.weight.data.copy_(gamma)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * gamma
    torch.testing.assert_close(rms(x), expected)

    ln = Norm(10, "LayerNorm", 1e-5, dtype=torch.float64)
    assert (ln.weight == 1).all() and (ln.bias == 0).all()
    ln.weight.data.copy_(gamma)
    ln.bias.data.copy_(beta)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mu) / (var + 1e-5).sqrt() * gamma + beta)

    zc = Norm(10, "LayerNorm", 1e-5, zero_centered_gamma=True, dtype=torch.float64)
    assert (zc.weight == 0).all()
    zc.weight.data.copy_(gamma - 1)
    zc.bias.data.copy_(beta)
    torch.testing.assert_close(zc(x), ln(x))


def test_norm_output_has_the_weight_dtype() -> None:
    norm = Norm(8, "RMSNorm", 1e-5, dtype=torch.bfloat16)
    x = torch.randn(3, 8)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.rms_norm(x, (8,), eps=1e-5), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------- masks


def test_sliding_window_mask() -> None:
    m = sliding_window_mask(5, (2, 0), torch.device("cpu"))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(sliding_window_mask(5, (-1, 0), torch.device("cpu")), causal)
    assert torch.equal(sliding_window_mask(5, (0, 0), torch.device("cpu")), torch.eye(5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- loss


def loss_inputs(n: int = 37, hidden: int = 24, vocab: int = 50, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[[0, 5, n - 1]] = IGNORE_INDEX
    upstream = torch.rand(n, generator=g, dtype=torch.float32) + 0.1
    return h, w, y, upstream


def reference(h, w, y, upstream):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), y, reduction="none", ignore_index=IGNORE_INDEX)
    (loss * upstream.double()).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("keep", [0, 1 << 30])
@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 64, None])
def test_linear_cross_entropy_matches_materialized_logits(chunk: int | None, keep: int) -> None:
    h, w, y, upstream = loss_inputs()
    ref_loss, ref_gh, ref_gw = reference(h, w, y, upstream)
    torch.testing.assert_close(cross_entropy(h @ w.t(), y).double(), ref_loss, rtol=1e-6, atol=1e-6)

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, y, chunk_tokens=chunk, keep_logits_bytes=keep)
    assert loss.shape == (37,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    (loss * upstream).sum().backward()
    assert hh.grad.dtype == torch.float64 and ww.grad.dtype == torch.float64
    torch.testing.assert_close(hh.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ww.grad, ref_gw, rtol=1e-5, atol=1e-6)
    ignored = y == IGNORE_INDEX
    assert (loss[ignored] == 0).all() and (loss[~ignored] > 0).all()
    assert (hh.grad[ignored] == 0).all() and (hh.grad[~ignored].abs().sum(-1) > 0).all()


def test_linear_cross_entropy_keeps_the_label_shape() -> None:
    h, w, y, _ = loss_inputs(n=24)
    loss = linear_cross_entropy(h.view(2, 12, -1), w, y.view(2, 12), chunk_tokens=5)
    assert loss.shape == (2, 12)
    torch.testing.assert_close(loss.view(-1), linear_cross_entropy(h, w, y, chunk_tokens=7))


def test_linear_cross_entropy_gradient_of_one_input_only() -> None:
    h, w, y, upstream = loss_inputs()
    _, ref_gh, ref_gw = reference(h, w, y, upstream)
    hh = h.clone().requires_grad_()
    (linear_cross_entropy(hh, w, y, chunk_tokens=8) * upstream).sum().backward()
    torch.testing.assert_close(hh.grad, ref_gh, rtol=1e-5, atol=1e-6)
    ww = w.clone().requires_grad_()
    (linear_cross_entropy(h, ww, y, chunk_tokens=8, keep_logits_bytes=1 << 30) * upstream).sum().backward()
    torch.testing.assert_close(ww.grad, ref_gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [0, 1 << 30])
def test_linear_cross_entropy_backward_twice(keep: int) -> None:
    h, w, y, upstream = loss_inputs()
    _, ref_gh, ref_gw = reference(h, w, y, upstream)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = (linear_cross_entropy(hh, ww, y, chunk_tokens=8, keep_logits_bytes=keep) * upstream).sum()
    out.backward(retain_graph=True)
    out.backward()
    torch.testing.assert_close(hh.grad, 2 * ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ww.grad, 2 * ref_gw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_under_no_grad() -> None:
    h, w, y, upstream = loss_inputs()
    ref_loss, _, _ = reference(h, w, y, upstream)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hh, ww, y, chunk_tokens=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    plain = linear_cross_entropy(h, w, y, chunk_tokens=8)  # no input needs a gradient
    assert not plain.requires_grad and torch.equal(plain, loss)


def test_linear_cross_entropy_all_ignored() -> None:
    h, w, y, _ = loss_inputs()
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, torch.full_like(y, IGNORE_INDEX), chunk_tokens=8)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (hh.grad == 0).all()


def test_unfused_cross_entropy_upcasts_half_precision_logits() -> None:
    logits = torch.randn(6, 40).to(torch.bfloat16)
    y = torch.randint(0, 40, (6,))
    out = cross_entropy(logits, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(logits.float(), y, reduction="none"))
    assert cross_entropy(logits, y, upcast=False).dtype == torch.float32


def test_default_chunk_tokens() -> None:
    assert default_chunk_tokens(128256) == 8192  # 2^30 elements / vocab, rounded down to 256
    assert default_chunk_tokens(1 << 30) == 256  # at least 256
    for vocab in (1000, 32000, 50304, 151936):
        c = default_chunk_tokens(vocab)
        assert c % 256 == 0 and c * vocab <= 1 << 30 < (c + 256) * vocab


# ---------------------------------------------------------------------------------- fused weight layouts


def _layer(**kw: object) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """Layer 0 of a tiny float64 GPT (8 heads of 8 channels) and its rotary tables for 12 tokens."""
    base: dict[str, object] = dict(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=8,
        vocab_size=32,
        seq_length=12,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        position_embedding_type="rope",
    )
    base.update(kw)
    torch.manual_seed(0)
    model = GPTModelProvider(**base).provide().double()  # type: ignore[arg-type]
    rope = model.rotary(12, None) if model.rotary is not None else None
    return model.decoder.layers[0], rope


def _old_layout_attention(attn: SelfAttention, w: torch.Tensor, b: torch.Tensor | None, x, rope):
    """Attention as it was computed from the version-1 layout [q heads | k groups | v groups]."""
    bsz, s, _ = x.shape
    heads, groups, d = attn.num_heads, attn.num_groups, attn.head_dim
    q, k, v = F.linear(x, w, b).view(bsz, s, heads + 2 * groups, d).split([heads, groups, groups], dim=2)
    if attn.q_layernorm is not None:
        q, k = attn.q_layernorm(q), attn.k_layernorm(k)
    if rope is not None:
        q, k = (apply_rotary(t, *rope, interleaved=attn.rotary_interleaved) for t in (q, k))
    out = attn.core_attention(*(t.transpose(1, 2) for t in (q, k, v)), None)
    return attn.linear_proj(out.transpose(1, 2).reshape(bsz, s, heads * d))


ATTENTION_KINDS = [
    dict(num_query_groups=8),  # multi-head
    dict(num_query_groups=2, add_qkv_bias=True, qk_layernorm=True),  # grouped-query
    dict(num_query_groups=1, attention_backend=AttnBackend.unfused),  # multi-query, math path
]


@pytest.mark.parametrize("kw", ATTENTION_KINDS, ids=["mha", "gqa", "mqa"])
def test_grouped_qkv_layout_computes_what_the_old_layout_did(kw: dict[str, object]) -> None:
    layer, rope = _layer(**kw)
    attn = layer.self_attention
    old_w = torch.randn_like(attn.linear_qkv.weight)
    old_b = torch.randn_like(attn.linear_qkv.bias) if attn.linear_qkv.bias is not None else None
    index = qkv_rows_v1_to_v2(attn.num_heads, attn.num_groups, attn.head_dim)
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(old_w[index])
        if old_b is not None:
            attn.linear_qkv.bias.copy_(old_b[index])
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    torch.testing.assert_close(attn(x, rope), _old_layout_attention(attn, old_w, old_b, x, rope))
    assert torch.equal(old_w[index][inverse(index)], old_w)
    if attn.num_groups not in (1, attn.num_heads):  # MQA: [q.. | k | v] is the same layout either way
        assert not torch.equal(index, torch.arange(index.numel()))


def test_interleaved_fc1_computes_what_gate_then_up_did() -> None:
    layer, _ = _layer(
        ffn_hidden_size=96, gated_linear_unit=True, activation_func="silu", add_bias_linear=True
    )
    mlp = layer.mlp
    old_w, old_b = torch.randn_like(mlp.linear_fc1.weight), torch.randn_like(mlp.linear_fc1.bias)
    index = fc1_rows_v1_to_v2(96)
    assert index[:6].tolist() == [0, 96, 1, 97, 2, 98]  # row 2i: gate unit i; row 2i + 1: up unit i
    with torch.no_grad():
        mlp.linear_fc1.weight.copy_(old_w[index])
        mlp.linear_fc1.bias.copy_(old_b[index])
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    gate, up = F.linear(x, old_w, old_b).chunk(2, dim=-1)  # the old [gate | up] layout
    torch.testing.assert_close(mlp(x), mlp.linear_fc2(F.silu(gate) * up))


def _shard(module: torch.nn.Module, name: str, rows: slice | None = None, cols: slice | None = None):
    """A copy of `module` whose Linear `name` keeps only those rows (outputs) or columns (inputs), as
    one tensor-parallel rank holds it (its bias: the rows' share; with columns, only the first rank's)."""
    copy = copy_module(module)
    lin: torch.nn.Linear = getattr(copy, name)
    w = lin.weight.detach()[rows] if rows is not None else lin.weight.detach()[:, cols]
    b = lin.bias
    if b is not None:
        b = b.detach()[rows] if rows is not None else (b.detach() if cols.start == 0 else None)
    part = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        part.weight.copy_(w)
        if b is not None:
            part.bias.copy_(b)
    setattr(copy, name, part)
    return copy


@pytest.mark.parametrize("tp", [2, 4])
def test_a_contiguous_row_shard_of_qkv_is_whole_query_groups(tp: int) -> None:
    layer, rope = _layer(num_query_groups=4, add_qkv_bias=True, qk_layernorm=True, add_bias_linear=True)
    attn = layer.self_attention
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    full = attn(x, rope)
    rows, cols = attn.linear_qkv.weight.shape[0] // tp, 8 * 8 // tp  # per rank: groups/tp of 2 heads
    heads_out = []
    total = torch.zeros_like(full)
    for r in range(tp):
        part = _shard(attn, "linear_qkv", rows=slice(r * rows, (r + 1) * rows))
        no_proj = copy_module(part)
        no_proj.linear_proj = torch.nn.Identity()
        heads_out.append(no_proj(x, rope))  # [b, s, this rank's heads * head_dim]
        # Row-parallel linear_proj: this rank's input columns; the partial sums add up to the output.
        total += _shard(part, "linear_proj", cols=slice(r * cols, (r + 1) * cols))(x, rope)
    whole = copy_module(attn)
    whole.linear_proj = torch.nn.Identity()
    torch.testing.assert_close(torch.cat(heads_out, dim=-1), whole(x, rope))
    torch.testing.assert_close(total, full)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_a_contiguous_row_shard_of_gated_fc1_is_whole_gate_up_pairs(tp: int) -> None:
    layer, _ = _layer(
        ffn_hidden_size=96, gated_linear_unit=True, activation_func="silu", add_bias_linear=True
    )
    mlp = layer.mlp
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    units = 96 // tp
    total = torch.zeros_like(x)
    for r in range(tp):  # rank r: fc1 rows of units [r * units, (r + 1) * units), fc2 their columns
        part = _shard(mlp, "linear_fc1", rows=slice(2 * r * units, 2 * (r + 1) * units))
        total += _shard(part, "linear_fc2", cols=slice(r * units, (r + 1) * units))(x)
    torch.testing.assert_close(total, mlp(x))
