"""Which shapes the Mamba mixer's fused Triton kernels take, without importing Triton.

The kernels' launchers (`ssd_triton`, `norm_triton`) and the parts that only need to know whether
they would run (the scan's dispatch, the memory estimate, which is made for CUDA runs and may be
made on a machine without Triton) share these rules.
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""The dtypes the kernels take for their inputs (float64 stays on the PyTorch path)."""
MAX_HEAD_DIM = 128
"""The widest head the scan's kernels keep in registers (float32 [block, width] accumulators)."""
MAX_STATE_DIM = 256
"""The widest state the scan's kernels keep in registers."""
MAX_GROUP_SIZE = 8192
"""The widest group the gated norm's kernels hold in registers (masked up to a power of two)."""
MAX_CONV_WIDTH = 16
"""The widest convolution the convolution's kernels unroll (Mamba-2 uses 4)."""


def scan_fits(chunk: int, head_dim: int, state_dim: int, dtype: torch.dtype) -> bool:
    """Whether the scan's kernels handle this shape: a chunk length that is a power of two of at
    least 16 (the tiles divide it and tl.dot needs 16 along every side), head_dim up to
    `MAX_HEAD_DIM`, state_dim up to `MAX_STATE_DIM` (any values: both are masked up to the next
    power of two) and one of `KERNEL_DTYPES`."""
    return (
        chunk >= 16
        and chunk & (chunk - 1) == 0
        and 1 <= head_dim <= MAX_HEAD_DIM
        and 1 <= state_dim <= MAX_STATE_DIM
        and dtype in KERNEL_DTYPES
    )


def conv_fits(width: int) -> bool:
    """Whether the convolution's kernels take a convolution `width` taps wide."""
    return 1 <= width <= MAX_CONV_WIDTH


def norm_fits(size: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the gated norm's kernels take rows of `size` channels in groups of `group_size`
    (dividing it, up to `MAX_GROUP_SIZE`, any value) for inputs of `dtype`."""
    return 1 <= group_size <= MAX_GROUP_SIZE and size % group_size == 0 and dtype in KERNEL_DTYPES


MIN_PROGRAMS = 1024
"""Programs enough to keep an H100's 132 multiprocessors busy (several resident on each)."""


def head_splits(programs: int, per_group: int) -> int:
    """How many programs share a group's heads in the scan's backward, where one program per tile
    and group would leave the GPU idle: the fewest (a divisor of the heads per group) that give at
    least `MIN_PROGRAMS` programs. Each share writes its own float32 partial sums."""
    return next(
        (d for d in range(1, per_group + 1) if per_group % d == 0 and programs * d >= MIN_PROGRAMS),
        per_group,
    )


def head_sum_rows(chunk: int, state_dim: int, dtype: torch.dtype) -> int:
    """Positions per program of the kernel that sums B's and C's gradients over a group's heads:
    64 over half-precision operands up to a 128-wide state, else 32 (registers), at most a chunk."""
    return min(chunk, 64 if state_dim <= 128 and dtype != torch.float32 else 32)
