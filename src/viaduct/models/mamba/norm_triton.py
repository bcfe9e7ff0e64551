"""The output stage of the Mamba-2 mixer, D skip plus gated RMSNorm, as fused Triton kernels.

`gated_norm_skip(y, x, D, z, weight, group_size, eps, out_dtype)` computes, in float32,

    h   = y + x * D[head]               the scan output plus the skip connection
    g   = h * silu(z)                   gated before the norm
    out = g * rstd * weight             rstd = 1 / sqrt(mean(g^2) + eps) over each group of channels

for y [b, L, h, p] (float32), x [b, L, h, p], z [b, L, h*p], D [h] and weight [h*p]; out is
[b, L, h*p] in out_dtype. Left to torch.compile, this and its backward become several kernels that
move about three times the bytes they need. Here each direction is one kernel that reads every
input element once and writes every output element once:

    forward   one program per (row, group): the whole group in registers, its rstd (float32) kept
              for the backward;
    backward  one program per (block of rows, group) recomputes h, g and n = g * rstd and gives
              dg = rstd * (dn - n * mean(dn * n))        with dn = dout * weight,
              dy = dg * silu(z),   dx = dy * D,   dz = dg * h * silu'(z),
              plus float32 partial sums over its rows of dout * n (weight) and dy * x (D) per
              channel, added up afterwards in a fixed order: no atomics, deterministic results.

x and z may be strided views (the mixer's slices of its projections, last dimension contiguous):
the kernels take their strides, so no copies are made. Both directions are `torch.library` custom
ops with fake implementations, so torch.compile keeps them as opaque calls inside a full graph.
This module imports Triton at import time; callers import it only where Triton is importable. With
TRITON_INTERPRET=1 the kernels also run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

# Programs per group of channels in the backward: enough to fill an H100 (132 multiprocessors, a few
# 16-warp programs on each), few enough that the [programs, h*p] partial sums stay a few percent of
# the traffic (each program loops over a block of rows).
_BACKWARD_PROGRAMS = 512


def _block(group_size: int) -> tuple[int, int]:
    """Lanes per program (the group size up to a power of two) and warps: 16 for rows of 4096 and
    up, keeping a few float32 vectors of the group per thread in registers."""
    block = triton.next_power_of_2(group_size)
    return block, max(1, min(16, block // 256))


@triton.jit
def _gate_input(Y, X, Z, r, cols, x_cols, mask, L, HP, sx_b, sx_l, sz_b, sz_l, d):
    """h = y + x * D, x and z (float32) of row r (= batch * L + position) at channels `cols`
    (x's channels at offsets `x_cols` within its row)."""
    b = r // L
    pos = r - b * L
    y = tl.load(Y + r * HP + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + b * sx_b + pos * sx_l + x_cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + b * sz_b + pos * sz_l + cols, mask=mask, other=0.0).to(tl.float32)
    return y + x * d, x, z


@triton.jit
def _channels(Dp, sx_h, G: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, X_FLAT: tl.constexpr):
    """The group's channels (program id 1 is the group), their mask, x's offsets within a row and
    each channel's D. X_FLAT: x's heads lie back to back (stride p), so its offsets are the channels
    themselves and the loads stay contiguous (vectorised)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < G
    cols = tl.program_id(1) * G + offs
    head = cols // P
    x_cols = cols if X_FLAT else head * sx_h + (cols - head * P)
    d = tl.load(Dp + head, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, x_cols, d


@triton.jit
def _forward_kernel(
    Y, X, Dp, Z, W, OUT, RSTD, L, HP, NG, sx_b, sx_l, sx_h, sz_b, sz_l, eps,
    G: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, X_FLAT: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)  # int64 rows: the offsets below may pass 2^31
    cols, mask, x_cols, d = _channels(Dp, sx_h, G, P, BLOCK, X_FLAT)
    h, _, z = _gate_input(Y, X, Z, r, cols, x_cols, mask, L, HP, sx_b, sx_l, sz_b, sz_l, d)
    g = h * z * tl.sigmoid(z)  # masked lanes: z = 0 gives g = 0, out of the sum
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / G + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r * HP + cols, g * rstd * w, mask=mask)
    tl.store(RSTD + r * NG + tl.program_id(1), rstd)


@triton.jit
def _backward_kernel(
    DOUT, Y, X, Dp, Z, W, RSTD, DY, DX, DZ, DW_PART, DD_PART, R, L, HP, NG,
    sx_b, sx_l, sx_h, sz_b, sz_l, ROWS, G: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
    X_FLAT: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0).to(tl.int64)
    cols, mask, x_cols, d = _channels(Dp, sx_h, G, P, BLOCK, X_FLAT)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    dd_acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = blk * ROWS
    for r in range(start, tl.minimum(start + ROWS, R)):
        h, x, z = _gate_input(Y, X, Z, r, cols, x_cols, mask, L, HP, sx_b, sx_l, sz_b, sz_l, d)
        dout = tl.load(DOUT + r * HP + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r * NG + tl.program_id(1))
        s = tl.sigmoid(z)
        gate = z * s
        n = h * gate * rstd
        # RMSNorm's backward: rstd depends on every g of the group, hence the projection term.
        dn = dout * w
        dg = rstd * (dn - n * (tl.sum(dn * n, axis=0) / G))
        dh = dg * gate
        dz = dg * h * s * (1.0 + z * (1.0 - s))  # silu'(z) = s (1 + z (1 - s))
        tl.store(DY + r * HP + cols, dh, mask=mask)
        tl.store(DX + r * HP + cols, dh * d, mask=mask)
        tl.store(DZ + r * HP + cols, dz, mask=mask)
        dw_acc += dout * n
        dd_acc += dh * x
    tl.store(DW_PART + blk * HP + cols, dw_acc, mask=mask)
    tl.store(DD_PART + blk * HP + cols, dd_acc, mask=mask)


def _strides(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """x and z with their last dimension contiguous (a copy only if it is not) and the strides the
    kernels address them by: x over batch, position and head; z over batch and position."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    z = z if z.stride(-1) == 1 else z.contiguous()
    return x, z, [x.stride(0), x.stride(1), x.stride(2), z.stride(0), z.stride(1)]


@torch.library.custom_op("viaduct::gated_norm_skip", mutates_args=())
def gated_norm_skip_op(
    y: torch.Tensor,
    x: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [b, L, h*p] in out_dtype and rstd [b, L, groups] float32 (kept for the backward)."""
    bsz, length, nheads, head_dim = y.shape
    hp, ng = nheads * head_dim, nheads * head_dim // group_size
    y = y.contiguous()
    x, z, strides = _strides(x, z)
    out = torch.empty(bsz, length, hp, dtype=out_dtype, device=y.device)
    rstd = torch.empty(bsz, length, ng, dtype=torch.float32, device=y.device)
    block, warps = _block(group_size)
    _forward_kernel[(bsz * length, ng)](
        y, x, D.contiguous(), z, weight.contiguous(), out, rstd, length, hp, ng, *strides, eps,
        group_size, head_dim, block, strides[2] == head_dim, num_warps=warps,
    )  # fmt: skip
    return out, rstd


@gated_norm_skip_op.register_fake
def _(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
    group_size: int, eps: float, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    bsz, length, nheads, head_dim = y.shape
    hp = nheads * head_dim
    return (
        y.new_empty((bsz, length, hp), dtype=out_dtype),
        y.new_empty((bsz, length, hp // group_size), dtype=torch.float32),
    )


@torch.library.custom_op("viaduct::gated_norm_skip_backward", mutates_args=())
def gated_norm_skip_backward_op(
    dout: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of y, x, D, z and weight (each in its input's dtype; y, x and z contiguous)."""
    bsz, length, nheads, head_dim = y.shape
    rows, hp, ng = bsz * length, nheads * head_dim, nheads * head_dim // group_size
    dev = y.device
    y, dout = y.contiguous(), dout.contiguous()
    x, z, strides = _strides(x, z)
    dy = torch.empty(y.shape, dtype=y.dtype, device=dev)
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev)
    per_program = triton.cdiv(rows, max(1, _BACKWARD_PROGRAMS // ng))
    nblocks = triton.cdiv(rows, per_program)
    dw_part = torch.empty(nblocks, hp, dtype=torch.float32, device=dev)
    dd_part = torch.empty(nblocks, hp, dtype=torch.float32, device=dev)
    block, warps = _block(group_size)
    _backward_kernel[(nblocks, ng)](
        dout, y, x, D.contiguous(), z, weight.contiguous(), rstd.contiguous(), dy, dx, dz, dw_part,
        dd_part, rows, length, hp, ng, *strides, per_program, group_size, head_dim, block,
        strides[2] == head_dim, num_warps=warps,
    )  # fmt: skip
    dweight = dw_part.sum(0).to(weight.dtype)
    dD = dd_part.sum(0).view(nheads, head_dim).sum(-1).to(D.dtype)
    return dy, dx, dD, dz, dweight


@gated_norm_skip_backward_op.register_fake
def _(
    dout: torch.Tensor, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
    weight: torch.Tensor, rstd: torch.Tensor, group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return (
        y.new_empty(y.shape),
        x.new_empty(x.shape),
        D.new_empty(D.shape),
        z.new_empty(z.shape),
        weight.new_empty(weight.shape),
    )


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float, torch.dtype
    ],
    output: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # The inputs and rstd only: the backward recomputes h, g and the normalised output from them.
    y, x, D, z, weight, group_size, _, _ = inputs
    ctx.save_for_backward(y, x, D, z, weight, output[1])
    ctx.group_size = group_size  # type: ignore[attr-defined]


def _autograd_backward(
    ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor | None, _drstd: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    y, x, D, z, weight, rstd = ctx.saved_tensors  # type: ignore[attr-defined]
    if dout is None:
        return None, None, None, None, None, None, None, None
    grads = gated_norm_skip_backward_op(dout, y, x, D, z, weight, rstd, ctx.group_size)  # type: ignore[attr-defined]
    return (*grads, None, None, None)


gated_norm_skip_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def gated_norm_skip(
    y: torch.Tensor,
    x: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """rmsnorm_groups((y + x * D) * silu(z)) * weight in out_dtype, [b, L, h*p], computed in float32
    (see the module docstring); differentiable in y, x, D, z and weight. Shapes: y and x
    [b, L, h, p], z [b, L, h*p], D [h], weight [h*p]; `kernel_shapes.norm_fits` tells the sizes
    the kernels take."""
    return gated_norm_skip_op(y, x, D, z, weight, group_size, eps, out_dtype)[0]
