"""Many 16-bit gradients widened into their float32 main gradients by one Triton kernel launch.

With float32 main gradients, every micro-batch's 16-bit gradient of every parameter is copied (the
first micro-batch of a step) or added (the others) into the parameter's float32 main gradient.
PyTorch does that as one kernel per parameter, and its mixed-dtype kernels run at about a third of
the memory bandwidth: for T5-base (about 390 parameters) that was 1.8 ms a micro-batch on an H100,
plus 390 launches from the host. `widen_into` does a whole list of them in one launch: a table of
(source address, destination address, size) goes to the device, and each program walks its
tensor's blocks, reading 16-bit values and writing (or adding into) float32 ones.

This module imports Triton at import time; `viaduct.training.main_grads` uses it only on CUDA
tensors where Triton imports. With TRITON_INTERPRET=1 the kernel also runs on CPU tensors, which is
how the tests check it.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

_BLOCK = 4096  # elements a program handles per loop turn (8 KiB of bf16, 16 KiB of float32)
_MAX_PROGRAMS_PER_TENSOR = 64  # a large tensor is walked by this many programs, a small one by fewer

_SOURCE_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _widen_kernel(
    table_ptr, ACCUMULATE: tl.constexpr, SRC: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """Program (t, j) handles blocks j, j + P, j + 2P, ... of tensor t (P programs per tensor)."""
    t = tl.program_id(0)
    src = tl.load(table_ptr + 3 * t).to(tl.pointer_type(SRC))
    dst = tl.load(table_ptr + 3 * t + 1).to(tl.pointer_type(tl.float32))
    n = tl.load(table_ptr + 3 * t + 2)
    step = tl.num_programs(1) * BLOCK
    for start in range(tl.program_id(1) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        value = tl.load(src + offs, mask=mask).to(tl.float32)
        if ACCUMULATE:
            value += tl.load(dst + offs, mask=mask)
        tl.store(dst + offs, value, mask=mask)


def widen_into(dsts: list[torch.Tensor], srcs: list[torch.Tensor], *, accumulate: bool) -> None:
    """dst += src (accumulate) or dst = src, widened to float32, for every pair, in one launch.

    The destinations are contiguous float32 tensors, the sources contiguous tensors of one dtype
    (bfloat16, float16 or float32) with the same number of elements each, all on one device.
    """
    if len(dsts) != len(srcs):
        raise ValueError(f"widen_into: {len(dsts)} destinations for {len(srcs)} sources")
    pairs = [(d, s) for d, s in zip(dsts, srcs) if d.numel() > 0]
    if not pairs:
        return
    dtype = pairs[0][1].dtype
    for d, s in pairs:
        if d.dtype != torch.float32 or not d.is_contiguous() or not s.is_contiguous():
            raise ValueError("widen_into needs contiguous tensors and float32 destinations")
        if s.dtype != dtype or d.numel() != s.numel() or d.device != s.device:
            raise ValueError("widen_into needs sources of one dtype, each the size of its destination")
    device = pairs[0][0].device
    rows = [(s.data_ptr(), d.data_ptr(), d.numel()) for d, s in pairs]
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    largest = max(n for _, _, n in rows)
    programs = min(_MAX_PROGRAMS_PER_TENSOR, triton.cdiv(largest, _BLOCK))
    _widen_kernel[(len(rows), programs)](table, ACCUMULATE=accumulate, SRC=_SOURCE_TYPES[dtype], BLOCK=_BLOCK)
