"""The Mamba-2 layer: the chunked SSD scan against the step-by-step recurrence, and the mixer against a
reference forward written out step by step, Hugging Face's Mamba2Mixer, bf16 and torch.compile."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from viaduct.models.conversion.mapping import rows_by_group, rows_by_section
from viaduct.models.mamba import GatedRMSNorm, Mamba2Mixer, segsum, ssd_chunked, ssd_recurrence

F64 = torch.float64


def _scan_inputs(
    b: int, length: int, h: int, p: int, g: int, n: int, seed: int, *, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    x = randn(b, length, h, p)
    dt = F.softplus(randn(b, length, h) - 1.0)  # positive, as after dt_bias + softplus
    A = -torch.rand(h, generator=gen, dtype=dtype) * 3.0 - 0.1
    return x, dt, A, randn(b, length, g, n), randn(b, length, g, n), randn(b, h, p, n)


@pytest.mark.parametrize(
    ("b", "length", "h", "p", "g", "n", "chunk"),
    [
        (2, 13, 4, 3, 1, 5, 1),  # chunks of one step
        (2, 13, 4, 3, 2, 5, 4),  # length not a multiple of the chunk
        (1, 37, 6, 4, 3, 2, 16),  # three groups of two heads, padded last chunk
        (2, 32, 4, 2, 4, 3, 16),  # one head per group, whole chunks
        (1, 5, 2, 3, 1, 4, 16),  # shorter than one chunk
        (1, 150, 2, 3, 1, 4, 2),  # 75 chunks: states passed on by the matmul, not the loop
    ],
)
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_ssd_chunked_equals_recurrence(
    b: int, length: int, h: int, p: int, g: int, n: int, chunk: int, with_initial_state: bool
) -> None:
    x, dt, A, B, C, s0 = _scan_inputs(b, length, h, p, g, n, seed=length * 31 + chunk)
    init = s0 if with_initial_state else None
    y, state = ssd_chunked(x, dt, A, B, C, chunk, init)
    y_ref, state_ref = ssd_recurrence(x, dt, A, B, C, init)
    assert y.shape == (b, length, h, p) and state.shape == (b, h, p, n)
    assert y.dtype == F64 and state.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=1e-10)


def test_ssd_final_state_continues_the_scan() -> None:
    # Scanning a sequence in two pieces, the second starting from the first's final state, is the
    # same as one scan: what generation after a prompt relies on.
    x, dt, A, B, C, _ = _scan_inputs(2, 23, 4, 3, 2, 5, seed=7)
    y, state = ssd_chunked(x, dt, A, B, C, 4)
    y1, s1 = ssd_chunked(x[:, :10], dt[:, :10], A, B[:, :10], C[:, :10], 4)
    y2, s2 = ssd_chunked(x[:, 10:], dt[:, 10:], A, B[:, 10:], C[:, 10:], 4, s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(s2, state, rtol=0, atol=1e-10)


def test_ssd_half_precision_inputs_scan_in_float32() -> None:
    x, dt, A, B, C, _ = _scan_inputs(1, 19, 4, 8, 2, 8, seed=3)
    y_ref, _ = ssd_recurrence(x, dt, A, B, C)
    y, state = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=0.05, atol=0.05)


def test_ssd_strong_decays_keep_gradients_finite_and_exact() -> None:
    # Decays of hundreds per step: above the diagonal the differences of running sums would overflow
    # exp (inf x 0 = NaN gradients) if the masked entries were not clamped first.
    x, dt, _, B, C, _ = _scan_inputs(1, 24, 2, 3, 1, 4, seed=11)
    A = torch.tensor([-200.0, -0.5], dtype=F64)
    grads = []
    for scan in (lambda *a: ssd_chunked(*a, 8), ssd_recurrence):
        leaves = [t.clone().requires_grad_() for t in (x, dt, B, C)]
        y, _ = scan(leaves[0], leaves[1], A, leaves[2], leaves[3])
        y.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g, g_ref in zip(*grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_segsum() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    s = segsum(a)
    for i in range(4):
        for j in range(4):
            expected = a[j + 1 : i + 1].sum().item() if j <= i else -math.inf
            assert s[i, j].item() == expected


def test_ssd_rejects_mismatched_shapes() -> None:
    x, dt, A, B, C, _ = _scan_inputs(1, 8, 4, 2, 2, 3, seed=0)
    with pytest.raises(ValueError, match=r"B \(1, 8, 3, 3\)"):
        ssd_chunked(x, dt, A, torch.zeros(1, 8, 3, 3, dtype=F64), C, 4)  # 4 heads, 3 groups
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, B, C, 0)


# ---------------------------------------------------------------------------------------------- mixer


def _mixer(dtype: torch.dtype = torch.float32, seed: int = 0, **kw: Any) -> Mamba2Mixer:
    torch.manual_seed(seed)
    args = {"state_dim": 8, "head_dim": 8, "num_groups": 2, "chunk_size": 8} | kw
    m = Mamba2Mixer(32, dtype=dtype, **args)
    # Larger than the init's small weights (and a non-trivial norm scale and D), so every path shows.
    with torch.no_grad():
        m.in_proj.weight.normal_(0.0, 0.3)
        m.out_proj.weight.normal_(0.0, 0.3)
        m.norm.weight.uniform_(0.5, 1.5)
        m.D.uniform_(0.5, 1.5)
    return m


def _mamba2_layout(m: Mamba2Mixer) -> dict[str, torch.Tensor]:
    """The mixer's state dict in Mamba-2's own layout: in_proj rows [z | x | B | C | dt] and conv
    channels [x | B | C] (the mixer keeps both by group)."""
    d, bc, g = m.d_inner, m.num_groups * m.state_dim, m.num_groups
    sd = dict(m.state_dict())
    sd["in_proj.weight"] = rows_by_section(sd["in_proj.weight"], (d, d, bc, bc, m.num_heads), g)
    for name in ("conv1d.weight", "conv1d.bias"):
        sd[name] = rows_by_section(sd[name], (d, bc, bc), g)
    return sd


def _reference_forward(m: Mamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
    """The mixer written out without its vectorised parts, from Mamba-2's layout of its weights: the
    convolution tap by tap, the scan step by step, the gated group norm by explicit loops over groups."""
    b, s, _ = hidden.shape
    sd = _mamba2_layout(m)
    proj = hidden @ sd["in_proj.weight"].T
    d, cd = m.d_inner, m.conv_dim
    z, xbc, dt_raw = proj[..., :d], proj[..., d : d + cd], proj[..., d + cd :]
    w = sd["conv1d.weight"][:, 0, :]  # [channels, k]; tap k-1 multiplies the current step
    k = w.shape[1]
    conv = torch.zeros_like(xbc)
    for t in range(s):
        acc = sd["conv1d.bias"].expand(b, cd).clone()
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                acc = acc + w[:, j] * xbc[:, src]
        conv[:, t] = acc
    conv = conv * torch.sigmoid(conv)
    gn = m.num_groups * m.state_dim
    x, B, C = conv[..., :d], conv[..., d : d + gn], conv[..., d + gn :]
    dt = torch.log1p(torch.exp(dt_raw + m.dt_bias))
    A = -torch.exp(m.A_log)
    xh = x.reshape(b, s, m.num_heads, m.head_dim)
    y, _ = ssd_recurrence(
        xh, dt, A, B.reshape(b, s, m.num_groups, m.state_dim), C.reshape(b, s, m.num_groups, m.state_dim)
    )
    y = (y + xh * m.D[:, None]).reshape(b, s, d)
    gated = y * z * torch.sigmoid(z)
    size = d // m.num_groups
    normed = torch.empty_like(gated)
    for grp in range(m.num_groups):
        part = gated[..., grp * size : (grp + 1) * size]
        rms = torch.sqrt((part**2).mean(-1, keepdim=True) + m.norm.eps)
        normed[..., grp * size : (grp + 1) * size] = part / rms
    return (normed * m.norm.weight) @ m.out_proj.weight.T


def test_rows_by_group_reorders_sections_and_back() -> None:
    # Two sections of 2 groups: [a0 a1 | b0 b1] -> [a0 b0 | a1 b1], and the inverse.
    t = torch.arange(8).reshape(8, 1)  # section a = rows 0-3 (2 rows per group), b = rows 4-7
    grouped = rows_by_group(t, (4, 4), 2)
    assert grouped.flatten().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert torch.equal(rows_by_section(grouped, (4, 4), 2), t)


def test_mixer_parameter_names_and_shapes() -> None:
    m = Mamba2Mixer(32, state_dim=8, head_dim=8, num_groups=2)
    # d_inner 64, 8 heads, conv over x, B, C = 64 + 2 * 2 * 8 = 96 channels.
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (64 + 96 + 8, 32),
        "conv1d.weight": (96, 1, 4),
        "conv1d.bias": (96,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (64,),
        "out_proj.weight": (32, 64),
    }
    # num_heads given: it sets d_inner, as Megatron's mamba_num_heads does.
    m = Mamba2Mixer(32, state_dim=8, head_dim=8, num_heads=4, num_groups=2)
    assert (m.d_inner, m.num_heads, m.out_proj.weight.shape) == (32, 4, (32, 32))


def test_mixer_rejects_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="num_heads 6 must be a positive multiple of num_groups 4"):
        Mamba2Mixer(24, head_dim=8, num_groups=4)
    with pytest.raises(ValueError, match="not a multiple of head_dim 48"):
        Mamba2Mixer(32, head_dim=48, num_groups=1)
    with pytest.raises(ValueError, match="dt_min") as e:
        Mamba2Mixer(32, head_dim=8, num_groups=1, dt_min=0.5, dt_max=0.1, A_init_range=(0.0, 1.0))
    assert "A_init_range" in str(e.value)  # every problem at once


def test_mixer_init() -> None:
    m = Mamba2Mixer(32, state_dim=8, head_dim=4, num_groups=2, dtype=F64)
    m.reset_parameters(torch.Generator().manual_seed(1), init_std=0.02, output_std=0.005)
    dt = F.softplus(m.dt_bias)
    assert torch.all(dt >= m.dt_min * (1 - 1e-9)) and torch.all(dt <= m.dt_max * (1 + 1e-9))
    a = torch.exp(m.A_log)
    assert torch.all(a >= 1.0) and torch.all(a <= 16.0) and a.std() > 0
    assert torch.equal(m.D, torch.ones_like(m.D)) and torch.equal(
        m.norm.weight, torch.ones_like(m.norm.weight)
    )
    assert abs(m.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.out_proj.weight.std().item() - 0.005) < 0.0005
    assert m.conv1d.weight.abs().max() <= 0.5 and m.conv1d.bias is not None
    # The generator decides every value.
    m2 = Mamba2Mixer(32, state_dim=8, head_dim=4, num_groups=2, dtype=F64)
    m2.reset_parameters(torch.Generator().manual_seed(1), init_std=0.02, output_std=0.005)
    for (name, p), p2 in zip(m.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, p2), name
    # A meta-device build initialises without values.
    Mamba2Mixer(32, head_dim=8, num_groups=2, device="meta").reset_parameters(torch.Generator())


def test_mixer_matches_step_by_step_reference() -> None:
    m = _mixer(F64, chunk_size=4)
    hidden = torch.randn(2, 11, 32, dtype=F64)
    torch.testing.assert_close(m(hidden), _reference_forward(m, hidden), rtol=0, atol=1e-10)


def test_mixer_is_causal() -> None:
    m = _mixer(F64)
    hidden = torch.randn(2, 20, 32, dtype=F64)
    out = m(hidden)
    for t in (0, 5, 8, 13, 19):  # inside chunks and on chunk boundaries
        changed = hidden.clone()
        changed[:, t:] = torch.randn_like(changed[:, t:]) * 3.0
        out2 = m(changed)
        torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=1e-12)
        assert (out2[:, t] - out[:, t]).abs().max() > 1e-3  # and the changed token does count


def test_mixer_gradient_reaches_every_parameter() -> None:
    m = _mixer(F64, bias=True)
    hidden = torch.randn(2, 10, 32, dtype=F64, requires_grad=True)
    m(hidden).square().mean().backward()
    for name, p in [*m.named_parameters(), ("input", hidden)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # The whole backward against finite differences, on a tiny mixer.
    tiny = Mamba2Mixer(8, state_dim=2, head_dim=4, num_groups=2, chunk_size=2, dtype=F64)
    inp = torch.randn(1, 5, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(tiny, (inp,))


def test_mixer_bf16_close_to_fp32() -> None:
    m32 = _mixer(torch.float32)
    m16 = _mixer(torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    hidden = torch.randn(2, 24, 32)
    out16 = m16(hidden.bfloat16())
    assert out16.dtype == torch.bfloat16
    out32 = m32(hidden)
    err = (out16.float() - out32).abs().max() / out32.abs().max()
    assert err < 0.03, err


def test_gated_rmsnorm_normalises_each_group() -> None:
    norm = GatedRMSNorm(8, 4, eps=0.0, dtype=F64)
    y = torch.randn(3, 8, dtype=F64)
    z = torch.full((3, 8), 20.0, dtype=F64)  # silu(20) ~ 20: a constant gate
    out = norm(y, z)
    for grp in out.split(4, dim=-1):
        torch.testing.assert_close(grp.square().mean(-1), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        GatedRMSNorm(8, 3)


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.02, 0.05)])
def test_mixer_matches_hugging_face_mamba2(dt_limit: tuple[float, float]) -> None:
    # The torch (no CUDA kernel) path of transformers' Mamba2Mixer, loaded with the same state dict:
    # pins the parameter names and the in_proj / conv channel layout for checkpoint import.
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from transformers import Mamba2Config

    torch.manual_seed(0)
    cfg = Mamba2Config(
        hidden_size=32,
        num_heads=8,
        head_dim=8,
        state_size=8,
        expand=2,
        n_groups=2,
        chunk_size=8,
        conv_kernel=4,
        num_hidden_layers=1,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        time_step_limit=dt_limit,
    )
    hf = modeling.Mamba2Mixer(cfg, layer_idx=0)
    ours = _mixer(torch.float32, dt_limit=dt_limit)
    assert sorted(hf.state_dict()) == sorted(ours.state_dict())
    hf.load_state_dict(_mamba2_layout(ours))
    hidden = torch.randn(2, 21, 32)  # not a multiple of the chunk
    with torch.no_grad():
        expected = hf(hidden)
        got = ours(hidden)
    # Hugging Face scans in float32 (also for float64 weights), so float32 tolerances.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mixer_compiles() -> None:
    m = _mixer(torch.float32)
    hidden = torch.randn(2, 19, 32, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(hidden)
    torch.testing.assert_close(out, m(hidden), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def _saved_bytes(fn, *args: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_the_mixer_recomputes_the_scan_in_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scan's float32 intermediates are not kept for backward: they are many times its inputs.
    import viaduct.models.mamba.mixer as mixer_module
    from viaduct.models.mamba import ssd_chunked

    torch.manual_seed(0)
    mixer = Mamba2Mixer(64, state_dim=16, head_dim=16, num_groups=2, chunk_size=32)
    hidden = torch.randn(2, 256, 64, requires_grad=True)
    kept_by_mixer = _saved_bytes(mixer, hidden)
    b, seq, h, p, g, n = 2, 256, mixer.num_heads, 16, 2, 16
    scan_inputs = (
        torch.randn(b, seq, h, p, requires_grad=True),
        torch.rand(b, seq, h, requires_grad=True),
        -torch.rand(h, requires_grad=True),
        torch.randn(b, seq, g, n, requires_grad=True),
        torch.randn(b, seq, g, n, requires_grad=True),
    )
    kept_by_scan = _saved_bytes(lambda *a: ssd_chunked(*a, 32), *scan_inputs)
    # The same mixer with the scan's intermediates kept (no recompute) keeps them on top.
    monkeypatch.setattr(mixer_module, "checkpoint", lambda fn, *args, **_: fn(*args))
    kept_without_recompute = _saved_bytes(mixer, hidden)
    assert kept_by_mixer + 0.9 * kept_by_scan <= kept_without_recompute
    monkeypatch.undo()
    out = mixer(hidden)
    out.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
