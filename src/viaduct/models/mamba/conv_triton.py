"""Mamba-2's causal depthwise convolution with its SiLU, forward and backward, as Triton kernels.

`conv_silu(x, weight, bias)` computes silu(conv(x) + bias) over time for x [b, L, channels] in the
channels-last layout the in-projection produces (x may be a strided slice of it: no copy is made).
Position t sees positions t-k+1 .. t; earlier ones count as zero.

Written as a sum of k shifted copies, torch.compile turns this and its backward into several passes:
each shift's gradient becomes its own padded copy, and the weight's gradient a separate reduction.
That costs about 1 ms a layer at Mamba-2 780M's shape on an H100. Here:

    forward   one kernel: out[t] = silu(bias + sum_j w[j] * x[t - (k-1) + j]), accumulated in
              float32;
    backward  two: the first recomputes the pre-activation from x and takes the SiLU's
              derivative (dpre, stored in float32); the second gives
              dx[t] = sum_s dpre[t + s] * w[k-1-s], and from the same tiles per-program float32
              partial sums of the weight's and bias's gradients (added up afterwards in a fixed
              order: no atomics, so the result is deterministic).

(One backward kernel that recomputed the pre-activation at every shift instead of storing dpre
needed k times the tiles live at once and spilled registers: 2.6 ms a layer.)

Both directions are `torch.library` custom ops with fake implementations, so torch.compile keeps
them as opaque calls inside a full graph. This module imports Triton at import time; the mixer uses
it only where `viaduct.models.mamba.ssd.uses_kernels` says the fused kernels run. With
TRITON_INTERPRET=1 the kernels also run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

from viaduct.models.mamba.kernel_shapes import MAX_CONV_WIDTH, conv_fits

# A tile of positions x channels per program (4 warps): 32 x 128 keeps each kernel's few float32
# tiles in registers.
_BLOCK_L, _BLOCK_C = 32, 128
_DX_BLOCKS = 8  # blocks of positions per program of the backward's second pass


@triton.jit
def _pre_activation(
    x_ptr, sxb, sxl, w_ptr, bias_ptr, pid_b, pos, chan, cmask, L, K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """bias + sum_j w[j] * x[pos - (K-1) + j] for a [BL, BC] tile, in float32 (zero before 0)."""
    acc = tl.zeros([BL, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        src = pos - (K - 1) + j
        m = ((src >= 0) & (src < L))[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + pid_b * sxb + src[:, None] * sxl + chan[None, :], mask=m, other=0.0)
        wj = tl.load(w_ptr + chan * K + j, mask=cmask, other=0.0)
        acc += xv.to(tl.float32) * wj.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_forward_kernel(
    x_ptr, sxb, sxl, w_ptr, bias_ptr, out_ptr, L, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """out [b, L, C] (contiguous) from x [b, L, C] (strides sxb, sxl; channels contiguous)."""
    # An int64 batch index: a batch of long, wide sequences passes 2^31 elements.
    pid_b, pid_l, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    pos = pid_l * BL + tl.arange(0, BL)
    chan = pid_c * BC + tl.arange(0, BC)
    cmask = chan < C
    acc = _pre_activation(x_ptr, sxb, sxl, w_ptr, bias_ptr, pid_b, pos, chan, cmask, L, K, HAS_BIAS, BL, BC)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (pos < L)[:, None] & cmask[None, :]
    offs = pid_b * L * C + pos[:, None] * C + chan[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def conv_dpre_kernel(
    x_ptr, sxb, sxl, w_ptr, bias_ptr, dout_ptr, sdb, sdl, dpre_ptr, L, C,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """The pre-activation's gradient dpre [b, L, C] (float32, contiguous)."""
    # An int64 batch index: a batch of long, wide sequences passes 2^31 elements.
    pid_b, pid_l, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    pos = pid_l * BL + tl.arange(0, BL)
    chan = pid_c * BC + tl.arange(0, BC)
    cmask = chan < C
    inside = (pos < L)[:, None] & cmask[None, :]
    g = tl.load(dout_ptr + pid_b * sdb + pos[:, None] * sdl + chan[None, :], mask=inside, other=0.0)
    g = g.to(tl.float32)
    if SILU:
        pre = _pre_activation(
            x_ptr, sxb, sxl, w_ptr, bias_ptr, pid_b, pos, chan, cmask, L, K, HAS_BIAS, BL, BC
        )
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre_ptr + pid_b * L * C + pos[:, None] * C + chan[None, :], g, mask=inside)


@triton.jit
def conv_dx_kernel(
    x_ptr, sxb, sxl, dpre_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, L, C, K: tl.constexpr, KP: tl.constexpr,
    NB: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """dx [b, L, C] (contiguous, its dtype) over NB blocks of BL positions, and their partial sums of
    the weight's gradient [C, KP] and the bias's [C] (float32, at row pid_b * programs + pid_l of dw
    and db). Position t reaches output t + s through tap K-1-s, so x[t] meets dpre[t + s] there."""
    # An int64 batch index: a batch of long, wide sequences passes 2^31 elements.
    pid_b, pid_l, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    chan = pid_c * BC + tl.arange(0, BC)
    cmask = chan < C
    taps = tl.arange(0, KP)
    dw = tl.zeros([BC, KP], dtype=tl.float32)
    db = tl.zeros([BC], dtype=tl.float32)
    for blk in range(NB):
        pos = (pid_l * NB + blk) * BL + tl.arange(0, BL)
        m = (pos < L)[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + pid_b * sxb + pos[:, None] * sxl + chan[None, :], mask=m, other=0.0)
        xv = xv.to(tl.float32)
        dx = tl.zeros([BL, BC], dtype=tl.float32)
        for s in tl.static_range(K):
            u = pos + s
            mu = (u < L)[:, None] & cmask[None, :]
            g = tl.load(dpre_ptr + pid_b * L * C + u[:, None] * C + chan[None, :], mask=mu, other=0.0)
            w_tap = tl.load(w_ptr + chan * K + (K - 1 - s), mask=cmask, other=0.0).to(tl.float32)
            dx += g * w_tap[None, :]
            dw += tl.where(taps[None, :] == K - 1 - s, tl.sum(g * xv, axis=0)[:, None], 0.0)
            if s == 0:
                db += tl.sum(g, axis=0)
        offs = pid_b * L * C + pos[:, None] * C + chan[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    row = pid_b * tl.num_programs(1) + pid_l
    tl.store(dw_ptr + row * C * KP + chan[:, None] * KP + taps[None, :], dw, mask=cmask[:, None])
    tl.store(db_ptr + row * C + chan, db, mask=cmask)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t [b, L, C] with its channels contiguous (a copy only if they are not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    b, length, chans = x.shape
    return b, triton.cdiv(length, _BLOCK_L), triton.cdiv(chans, _BLOCK_C)


@torch.library.custom_op("viaduct::conv_silu", mutates_args=())
def conv_silu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """silu(causal depthwise conv(x) + bias) (or without the SiLU) for x [b, L, C] and weight [C, k],
    in x's dtype."""
    x = _channels_last(x)
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    conv_forward_kernel[_grid(x)](
        x, x.stride(0), x.stride(1), weight, weight if bias is None else bias, out, x.shape[1], x.shape[2],
        weight.shape[1], bias is not None, silu, _BLOCK_L, _BLOCK_C, num_warps=4,
    )  # fmt: skip
    return out


@conv_silu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("viaduct::conv_silu_backward", mutates_args=())
def conv_silu_backward_op(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `conv_silu_op`'s x (x's dtype), weight and bias (the weight's dtype; a bias's
    gradient even where there was no bias, which the caller drops)."""
    x, dout = _channels_last(x), _channels_last(dout)
    weight = weight.contiguous()
    chans, width = weight.shape
    grid = _grid(x)
    dpre = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    conv_dpre_kernel[grid](
        x, x.stride(0), x.stride(1), weight, weight if bias is None else bias, dout, dout.stride(0),
        dout.stride(1), dpre, x.shape[1], chans, width, bias is not None, silu, _BLOCK_L, _BLOCK_C,
        num_warps=4,
    )  # fmt: skip
    # Each program of the second pass walks several blocks of positions, so the partial sums of the
    # weight's and bias's gradients (one row per program) stay a few MB.
    dx_grid = (grid[0], triton.cdiv(grid[1], _DX_BLOCKS), grid[2])
    taps = triton.next_power_of_2(width)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(dx_grid[0] * dx_grid[1], chans, taps, dtype=torch.float32, device=x.device)
    db = torch.empty(dx_grid[0] * dx_grid[1], chans, dtype=torch.float32, device=x.device)
    conv_dx_kernel[dx_grid](
        x, x.stride(0), x.stride(1), dpre, weight, dx, dw, db, x.shape[1], chans, width, taps,
        _DX_BLOCKS, _BLOCK_L, _BLOCK_C, num_warps=4,
    )  # fmt: skip
    return dx, dw.sum(0)[:, :width].to(weight.dtype), db.sum(0).to(weight.dtype)


@conv_silu_backward_op.register_fake
def _(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[:1]),
    )


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool],
    output: torch.Tensor,
) -> None:
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)  # type: ignore[arg-type]  # None is saved as None
    ctx.silu = silu  # type: ignore[attr-defined]


def _autograd_backward(
    ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias = ctx.saved_tensors  # type: ignore[attr-defined]
    dx, dw, db = conv_silu_backward_op(dout, x, weight, bias, ctx.silu)  # type: ignore[attr-defined]
    return dx, dw, (db if bias is not None else None), None


conv_silu_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def conv_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, silu: bool = True
) -> torch.Tensor:
    """silu(causal depthwise convolution of x [b, L, C] over time + bias), or without the SiLU;
    `weight` is `nn.Conv1d`'s depthwise [C, 1, k] (or [C, k]). The result has x's dtype."""
    if weight.dim() == 3:
        weight = weight[:, 0, :]
    if not conv_fits(weight.shape[1]):
        raise ValueError(
            f"conv_silu: a convolution {weight.shape[1]} wide is outside the kernels' 1 to {MAX_CONV_WIDTH}"
        )
    return conv_silu_op(x, weight, bias, silu)
