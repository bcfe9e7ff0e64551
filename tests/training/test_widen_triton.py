"""The Triton kernel that widens many 16-bit gradients into float32 main gradients in one launch,
against PyTorch's copy and add.

Run on CUDA where it is available (marked `gpu`) and on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`, with Triton importable); skipped elsewhere.

    PYTHONPATH=/path/to/triton TRITON_INTERPRET=1 pytest -q tests/training/test_widen_triton.py   # CPU
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from viaduct.testing.kernels import TRITON_DEVICES
from viaduct.training.config import OptimizerConfig
from viaduct.training.main_grads import AccumulatedMainGrads
from viaduct.training.optim import build_optimizer

# Sizes around the kernel's block (4096 elements) and its cap on programs per tensor (64 blocks).
SIZES = [1, 7, 4095, 4096, 4097, 64 * 4096 + 5, 3]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
def test_widen_into_matches_copy_and_add(device: str, dtype: torch.dtype, accumulate: bool) -> None:
    from viaduct.training.widen_triton import widen_into

    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(n, generator=g).to(dtype).to(device) for n in SIZES]
    # Destinations are views into one flat buffer, as a data-parallel bucket's main gradients are.
    flat = torch.randn(sum(SIZES) + 3, generator=g).to(device)
    dsts = list(flat[3:].split(SIZES))
    untouched = flat[:3].clone()
    expected = [d + s.float() if accumulate else s.float() for d, s in zip(dsts, srcs)]
    widen_into(dsts, srcs, accumulate=accumulate)
    for got, want in zip(dsts, expected, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(flat[:3], untouched)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_widen_into_refuses_what_it_cannot_do(device: str) -> None:
    from viaduct.training.widen_triton import widen_into

    bf16 = torch.zeros(4, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="float32 destinations"):
        widen_into([torch.zeros(4, dtype=torch.bfloat16, device=device)], [bf16], accumulate=True)
    with pytest.raises(ValueError, match="contiguous"):
        widen_into([torch.zeros(4, 2, device=device).t()], [bf16.repeat(2).view(2, 4)], accumulate=True)
    with pytest.raises(ValueError, match="one dtype"):
        widen_into(
            [torch.zeros(4, device=device)] * 2,
            [bf16, torch.zeros(4, dtype=torch.float16, device=device)],
            accumulate=True,
        )
    with pytest.raises(ValueError, match="2 destinations for 1 sources"):
        widen_into([torch.zeros(4, device=device)] * 2, [bf16], accumulate=True)
    widen_into([], [], accumulate=True)  # nothing to do


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_main_grads_on_cuda_sum_micro_batches_as_pytorch_does() -> None:
    """The optimizer's float32 main gradients of a bf16 model on CUDA (widened by the kernel, several
    launches a backward pass) equal PyTorch's float32 sum of each micro-batch's bf16 gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda().bfloat16()
    params = list(model.parameters())
    cfg = OptimizerConfig(lr=1e-3)
    cfg.finalize()
    opt = build_optimizer(cfg, model, fp32_main_grads=False)
    main = opt.main_grads = AccumulatedMainGrads(opt.slots, flush_bytes=40_000)
    batches = [torch.randn(32, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    opt.zero_grad()
    for x in batches:
        main.accumulate_in_backward(False)
        model(x).float().square().mean().backward()
        for e, p in zip(expected, params):
            e += p.grad.float()
            p.grad = None
        main.accumulate_in_backward(True)
        model(x).float().square().mean().backward()
    for e, s in zip(expected, opt.slots, strict=True):
        assert torch.equal(s.master.grad, e)
