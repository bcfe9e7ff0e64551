"""The fused Triton D skip + gated RMSNorm (forward and backward) against a float64 evaluation.

The tests run on CUDA where it is available (marked `gpu`) and on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`, with Triton importable); elsewhere they are skipped.

    PYTHONPATH=/path/to/triton TRITON_INTERPRET=1 pytest -q tests/models/test_gated_norm_triton.py   # CPU
    pytest -q -m gpu tests/models/test_gated_norm_triton.py                                        # GPU
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from viaduct.testing.kernels import TRITON_DEVICES, relative_error

DEVICES = TRITON_DEVICES

EPS = 1e-5
# y, x, D, z, weight: the differentiable inputs of `gated_norm_skip`.
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _reference(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor, w: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The mixer's formula in float64 (no final rounding): the exact value the kernels approximate."""
    b, length, h, p = y.shape
    f = torch.float64
    u = y.to(f) + x.to(f) * D.to(f)[:, None]
    g = u.reshape(b, length, h * p) * F.silu(z.to(f))
    g = g.unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + EPS)
    return g.flatten(-2) * w.to(f)


def _inputs(bsz: int, length: int, h: int, p: int, device: str, dtype: torch.dtype = torch.float32) -> Inputs:
    """y (float32, contiguous), x and z as strided slices of one projection (as the mixer makes
    them), D and weight; x, z and weight in `dtype`. All leaves that require grad."""
    hp = h * p
    proj = torch.randn(bsz, length, 3 + 2 * hp + 5, device=device).to(dtype)
    z = proj[..., 3 : 3 + hp]
    x = proj[..., 3 + hp : 3 + 2 * hp].unflatten(-1, (h, p))
    y = torch.randn(bsz, length, h, p, device=device)
    D = torch.randn(h, device=device)
    w = (1.0 + 0.1 * torch.randn(hp, device=device)).to(dtype)
    for t in (y, x, D, z, w):
        t.requires_grad_()
    return y, x, D, z, w


def _grads(out: torch.Tensor, inputs: Inputs, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout.to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("bsz", "length", "h", "p", "group_size"),
    [
        (2, 5, 4, 16, 64),  # one group over the whole row
        (2, 7, 4, 16, 16),  # several groups, one per head
        (1, 9, 3, 40, 60),  # groups not a power of two, crossing heads
        (3, 3, 3, 40, 40),
    ],
)
def test_float32_against_float64(device: str, bsz: int, length: int, h: int, p: int, group_size: int) -> None:
    from viaduct.models.mamba.norm_triton import gated_norm_skip

    torch.manual_seed(0)
    inputs = _inputs(bsz, length, h, p, device)
    assert not inputs[1].is_contiguous() and not inputs[3].is_contiguous()
    out = gated_norm_skip(*inputs, group_size, EPS, torch.float32)
    want = _reference(*inputs, group_size)
    assert out.shape == (bsz, length, h * p) and out.dtype == torch.float32
    assert relative_error(out, want) < 1e-6
    dout = torch.randn_like(want)
    for got, ref in zip(_grads(out, inputs, dout), _grads(want, inputs, dout)):
        assert got.dtype == torch.float32
        assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_row_blocks_with_a_remainder(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 26 rows over at most 4 backward programs per group: blocks of 7 rows, the last one of 5.
    from viaduct.models.mamba import norm_triton

    monkeypatch.setattr(norm_triton, "_BACKWARD_PROGRAMS", 8)
    torch.manual_seed(1)
    inputs = _inputs(2, 13, 2, 16, device)
    out = norm_triton.gated_norm_skip(*inputs, 16, EPS, torch.float32)
    want = _reference(*inputs, 16)
    assert relative_error(out, want) < 1e-6
    dout = torch.randn_like(want)
    for got, ref in zip(_grads(out, inputs, dout), _grads(want, inputs, dout)):
        assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_heads_not_back_to_back(device: str) -> None:
    # x's heads spaced wider than p (a general strided view): the kernels' gathered addressing.
    from viaduct.models.mamba.norm_triton import gated_norm_skip

    torch.manual_seed(5)
    y, x, D, z, w = _inputs(2, 5, 3, 40, device)
    x = torch.randn(2, 5, 3, 40 + 6, device=device)[..., 2:42].requires_grad_()
    inputs = (y, x, D, z, w)
    out = gated_norm_skip(*inputs, 60, EPS, torch.float32)
    want = _reference(*inputs, 60)
    assert relative_error(out, want) < 1e-6
    dout = torch.randn_like(want)
    for got, ref in zip(_grads(out, inputs, dout), _grads(want, inputs, dout)):
        assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_bf16(device: str) -> None:
    # bf16 x, z, weight and output (the mixer's training dtype): against float64 on the same inputs.
    from viaduct.models.mamba.norm_triton import gated_norm_skip

    torch.manual_seed(2)
    inputs = _inputs(2, 6, 4, 16, device, torch.bfloat16)
    out = gated_norm_skip(*inputs, 32, EPS, torch.bfloat16)
    want = _reference(*inputs, 32)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, want) < 1e-2
    dout = torch.randn_like(want).bfloat16()
    for got, ref, t in zip(_grads(out, inputs, dout), _grads(want, inputs, dout), inputs):
        assert got.dtype == t.dtype
        assert relative_error(got, ref) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_full_graph(device: str) -> None:
    # The custom ops are opaque to torch.compile: forward and backward in one graph. The CPU
    # interpreter runs under aot_eager (dynamo and autograd tracing, no code generation).
    from viaduct.models.mamba.norm_triton import gated_norm_skip

    torch.manual_seed(3)
    inputs = _inputs(2, 4, 2, 16, device)

    def fn(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor, w: torch.Tensor):
        return gated_norm_skip(y, x, D, z, w, 16, EPS, torch.float32) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    out_e = fn(*inputs)
    grads_e = torch.autograd.grad(out_e.square().sum(), inputs)
    assert relative_error(out, out_e) < 1e-6
    for got, want in zip(grads, grads_e):
        assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_registered_ops(device: str) -> None:

    assert hasattr(torch.ops.viaduct, "gated_norm_skip")
    assert hasattr(torch.ops.viaduct, "gated_norm_skip_backward")
    torch.manual_seed(4)
    y, x, D, z, w = (t.detach() for t in _inputs(1, 3, 2, 16, device))
    args = (y.requires_grad_(), x.requires_grad_(), D.requires_grad_(), z.requires_grad_(), w)
    torch.library.opcheck(torch.ops.viaduct.gated_norm_skip.default, (*args, 16, EPS, torch.float32))
