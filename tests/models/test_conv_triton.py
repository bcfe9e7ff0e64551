"""The Triton causal convolution + SiLU of the Mamba mixer against its PyTorch form.

Run on CUDA where it is available (marked `gpu`) and on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`, with Triton importable); skipped elsewhere.

    PYTHONPATH=/path/to/triton TRITON_INTERPRET=1 pytest -q tests/models/test_conv_triton.py   # CPU
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from viaduct.models.mamba.kernel_shapes import MAX_CONV_WIDTH
from viaduct.models.mamba.mixer import Mamba2Mixer, _causal_depthwise_conv
from viaduct.models.mamba.ssd import ssd_backend
from viaduct.testing.kernels import TRITON_DEVICES, relative_error

DEVICES = TRITON_DEVICES


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu: bool) -> torch.Tensor:
    out = _causal_depthwise_conv(x, w, b)
    return F.silu(out) if silu else out


def _inputs(
    bsz: int, length: int, chans: int, width: int, device: str, dtype: torch.dtype, bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # x is a strided slice of a wider projection, as the mixer hands it over.
    proj = torch.randn(bsz, length, chans + 24, device=device, dtype=dtype)
    x = proj[..., 8 : 8 + chans].detach().requires_grad_()
    w = (torch.randn(chans, 1, width, device=device) / width**0.5).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(chans, device=device)).to(dtype).requires_grad_() if bias else None
    return proj, x, w, b


def _forward_backward(
    fn: object, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu: bool, dout: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x, w] + ([b] if b is not None else [])
    out = fn(x, w, b, silu)  # type: ignore[operator]
    return out, list(torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("length", "chans", "width", "bias", "silu"),
    [(300, 136, 4, True, True), (64, 128, 4, False, True), (70, 40, 3, True, False), (5, 8, 4, True, True)],
)
def test_matches_pytorch_in_float32(
    device: str, length: int, chans: int, width: int, bias: bool, silu: bool
) -> None:
    # Positions and channels that fill no tile (300 positions: two programs of the backward's second
    # pass), a sequence shorter than the convolution, no bias, another width, without the SiLU:
    # output and every gradient against float64.
    from viaduct.models.mamba.conv_triton import conv_silu

    torch.manual_seed(0)
    _, x, w, b = _inputs(2, length, chans, width, device, torch.float32, bias)
    dout = torch.randn(2, length, chans, device=device)
    out, grads = _forward_backward(lambda *a: conv_silu(*a[:3], silu=a[3]), x, w, b, silu, dout)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    out64, grads64 = _forward_backward(_reference, x64, w64, b64, silu, dout.double())
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert relative_error(out, out64) < 1e-6
    for got, want in zip(grads, grads64):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_against_float32(device: str) -> None:
    from viaduct.models.mamba.conv_triton import conv_silu

    torch.manual_seed(1)
    _, x, w, b = _inputs(2, 96, 72, 4, device, torch.bfloat16, True)
    dout = torch.randn(2, 96, 72, device=device, dtype=torch.bfloat16)
    out, grads = _forward_backward(lambda *a: conv_silu(*a[:3], silu=a[3]), x, w, b, True, dout)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert b is not None
    leaves = [t.detach().float().requires_grad_() for t in (x, w, b)]
    want, want_grads = _forward_backward(_reference, *leaves, True, dout.float())
    assert relative_error(out, want) < 1e-2
    for got, ref in zip(grads, want_grads):
        assert relative_error(got, ref) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_full_graph(device: str) -> None:
    # The custom ops are opaque to torch.compile: forward and backward trace as one graph. The CPU
    # interpreter runs under aot_eager (dynamo and autograd tracing, no code generation).
    from viaduct.models.mamba.conv_triton import conv_silu

    torch.manual_seed(2)
    proj, _, w, b = _inputs(1, 80, 48, 4, device, torch.float32, True)

    def f(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return conv_silu(p[..., 8:56], w, b).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    leaves = [proj.detach().requires_grad_(), w, b]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(_reference(leaves[0][..., 8:56], w, b, True).square().sum(), leaves)
    for g, r in zip(got, want):
        assert relative_error(g, r) < 1e-5


def test_refuses_a_convolution_wider_than_its_kernels() -> None:
    pytest.importorskip("triton")
    from viaduct.models.mamba.conv_triton import conv_silu

    x = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="wide is outside"):
        conv_silu(x, torch.zeros(8, 1, MAX_CONV_WIDTH + 1), None)


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixer_wider_than_the_kernels_keeps_the_pytorch_convolution(device: str) -> None:
    # The scan and norm still take their kernels; the convolution falls back instead of failing.
    torch.manual_seed(3)
    mixer = Mamba2Mixer(
        32, state_dim=16, head_dim=16, num_groups=1, chunk_size=16, conv_kernel=MAX_CONV_WIDTH + 1
    )
    mixer.to(device)
    x = torch.randn(2, 40, 32, device=device, requires_grad=True)
    outs = []
    for backend in ("triton", "torch"):
        with ssd_backend(backend):
            out = mixer(x)
            outs.append((out, torch.autograd.grad(out.square().sum(), [x, mixer.conv1d.weight])))
    (out, grads), (out_t, grads_t) = outs
    assert relative_error(out, out_t) < 1e-5
    for got, want in zip(grads, grads_t):
        assert relative_error(got, want) < 1e-4
