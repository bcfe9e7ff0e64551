"""The whole SSD scan of Mamba-2 as fused Triton kernels (`viaduct.models.mamba.ssd_kernels`).

`ssd_scan_op(x, dt, A, B, C, initial_state, chunk_size, out_dtype)` computes what `ssd_chunked`
computes (same arguments, positions a multiple of the chunk, y in out_dtype) without the
intermediates of the PyTorch form: that form builds a [chunk, chunk] weight matrix per head and
chunk, decays and states as separate float32 tensors, and autograd keeps them (at Mamba-2 780M's
shape, several GB per layer moved per step). Here

    forward   the states entering each chunk (one kernel: a program carries a block of a head's
              state over the chunks of its row, adding each chunk's own state, a matmul, as it
              goes), then the output (the entering state through C plus the chunk's own inputs,
              the [chunk, chunk] weights built tile by tile in registers);
    backward  saves only the inputs and recomputes the entering states, then the gradients by
              five kernels (see `_backward`) and a few small PyTorch sums.

Both directions are `torch.library` custom ops with fake (meta) implementations, so torch.compile
treats them as opaque calls inside a full graph and never traces Triton itself; the scan needs no
activation checkpoint around it (it keeps only its inputs).

This module imports Triton at import time; `viaduct.models.mamba.ssd` imports it only where Triton
is importable. With TRITON_INTERPRET=1 the kernels also run on CPU tensors (slowly), which is how the
tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton  # type: ignore[import-not-found,unused-ignore]

from viaduct.models.mamba import ssd_kernels as k
from viaduct.models.mamba.kernel_shapes import head_splits, head_sum_rows


def _tile(chunk: int, dtype: torch.dtype) -> tuple[int, int]:
    """Tile side along the chunk and warps per program. 64 over half-precision operands (wgmma with
    8 warps on an H100); 32 with 4 warps over float32 operands, whose exact FMA dots need more
    registers."""
    tile = min(chunk, 32 if dtype == torch.float32 else 64)
    return tile, 8 if tile == 64 else 4


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _dot_args(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision, upcast) of the kernels' dots: float32 operands exact, as torch's float32
    matmul (TF32 off by default) gives; half precision ignores the setting. Triton's CPU interpreter
    multiplies bf16 blocks as their raw bits (NumPy has no bfloat16): there the operands, already
    rounded to bf16, go to tl.dot as float32, which gives the same products."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return ("ieee" if dtype == torch.float32 else "tf32"), upcast


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """t [b, L, heads or groups, width] with its last dimension contiguous (a copy only if it is
    not), and its strides over batch, position and head."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(2)


class _Prep:
    """What both directions derive from the inputs: sizes, the running sums of the log-decays
    [b, h, chunks, Q] and CB [b, chunks, g, Q, Q] (per group: small)."""

    def __init__(
        self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, q: int
    ):
        self.bsz, self.length, self.nheads, self.head_dim = x.shape
        self.ngroups, self.d_state = B.shape[2], B.shape[3]
        self.q, self.nchunks = q, self.length // q
        self.rep = self.nheads // self.ngroups
        self.op = x.dtype
        self.x, *self.sx = _rows(x)
        self.B, *self.sb = _rows(B)
        self.C, *self.sc = _rows(C)
        self.dt = dt.float().contiguous()
        a = (self.dt * A.float()).view(self.bsz, self.nchunks, q, self.nheads)
        self.acs = a.permute(0, 3, 1, 2).cumsum(-1).contiguous()  # [b, h, c, Q]
        Cc = self.C.view(self.bsz, self.nchunks, q, self.ngroups, self.d_state)
        Bc = self.B.view(self.bsz, self.nchunks, q, self.ngroups, self.d_state)
        self.cb = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc).contiguous()
        self.tile, self.warps = _tile(q, self.op)
        self.bp, self.bn = _pow2(self.head_dim), _pow2(self.d_state)
        self.dot_prec, self.upcast = _dot_args(self.op)

    def states_shape(self) -> tuple[int, ...]:
        return (self.bsz, self.nchunks, self.nheads, self.head_dim, self.d_state)

    def _state_grid(self) -> tuple[tuple[int, int, int], int, int]:
        # Blocks of a head's state: 64 x 64 over half-precision operands (wgmma), 32 x 32 over
        # float32 (exact FMA dots); each program carries its block over every chunk of its row.
        side = 32 if self.op == torch.float32 else 64
        bp, bn = min(side, self.bp), min(side, self.bn)
        grid = (self.bsz * self.nheads, triton.cdiv(self.head_dim, bp), triton.cdiv(self.d_state, bn))
        return grid, bp, bn

    def states(self, initial: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`state_forward_kernel`: the states entering the chunks [b, c, h, P, N] (operand dtype)
        and the final state [b, h, P, N] float32."""
        entering = torch.empty(self.states_shape(), dtype=self.op, device=self.x.device)
        shape = (self.bsz, self.nheads, self.head_dim, self.d_state)
        final = torch.empty(shape, dtype=torch.float32, device=self.x.device)
        init = final if initial is None else initial.float().contiguous()
        grid, bp, bn = self._state_grid()
        k.state_forward_kernel[grid](
            self.x, *self.sx, self.dt, self.acs, self.B, *self.sb, init, entering, final,
            self.nchunks, self.length, self.nheads, self.rep, self.q, self.head_dim, self.d_state,
            self.tile, bp, bn, initial is not None, self.dot_prec, self.upcast, num_warps=4,
        )  # fmt: skip
        return entering, final

    def state_grads(
        self, dy: torch.Tensor, entering: torch.Tensor, d_final: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`state_backward_kernel`: the gradients of the chunks' own states [b, c, h, P, N] (operand
        dtype), of the initial state [b, h, P, N] float32 and of each chunk's log-decay [b, h, c]."""
        d_states = torch.empty(self.states_shape(), dtype=self.op, device=dy.device)
        d_init = torch.empty(
            self.bsz, self.nheads, self.head_dim, self.d_state, dtype=torch.float32, device=dy.device
        )
        grid, bp, bn = self._state_grid()
        d_decay = torch.empty(
            self.bsz, self.nheads, self.nchunks, grid[1] * grid[2], dtype=torch.float32, device=dy.device
        )
        dfin = d_init if d_final is None else d_final.float().contiguous()
        k.state_backward_kernel[grid](
            dy, self.dt, self.acs, self.C, *self.sc, entering, dfin, d_states, d_init, d_decay, self.nchunks,
            self.length, self.nheads, self.rep, self.q, self.head_dim, self.d_state, self.tile, bp, bn,
            d_final is not None, self.dot_prec, self.upcast, num_warps=4,
        )  # fmt: skip
        return d_states, d_init, d_decay.sum(-1)


def _forward(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None, chunk_size: int, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    s = _Prep(x, dt, A, B, C, chunk_size)
    entering, final = s.states(initial_state)
    y = torch.empty(s.bsz, s.length, s.nheads, s.head_dim, dtype=out_dtype, device=x.device)
    grid = (s.bsz * s.nchunks, s.nheads, s.q // s.tile)
    k.chunk_scan_kernel[grid](
        s.x, *s.sx, s.dt, s.acs, s.cb, s.C, *s.sc, entering, y, s.nchunks, s.length,
        s.nheads, s.rep, s.ngroups, s.q, s.head_dim, s.d_state, s.tile, s.tile, s.bp, min(s.bn, 128),
        s.dot_prec, s.upcast, num_warps=s.warps,
    )  # fmt: skip
    return y, final


@torch.library.custom_op("viaduct::ssd_scan", mutates_args=())
def ssd_scan_op(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [b, L, h, p] (in out_dtype) and the final state [b, h, p, n] (float32) from x [b, L, h, p],
    dt [b, L, h] (float32), A [h], B and C [b, L, g, n] (x's dtype) and an optional initial state
    [b, h, p, n]; L a multiple of chunk_size."""
    return _forward(x, dt, A, B, C, initial_state, chunk_size, out_dtype)


@ssd_scan_op.register_fake
def _(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None, chunk_size: int, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    b, _, h, p = x.shape
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((b, h, p, B.shape[3]), dtype=torch.float32)


def _backward(
    dy: torch.Tensor, d_final: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of x, dt, A, B, C and the initial state (x, B, C in their dtypes; the rest float32).

    1. Recompute the states entering the chunks (forward's first kernel).
    2. The state pass backwards (`state_backward_kernel`): each chunk's outputs send a gradient to
       its entering state (a matmul), which is carried back over the chunks into each chunk's
       own-state gradient and the chunk decays' gradients.
    3. d x and d dt through xdt (`chunk_dx_kernel`); d CB and the within-chunk decay exponents
       (`chunk_cb_backward_kernel`); C's gradient through the entering states and B's through the
       own states, with their exponents' gradients (`head_sum_kernel`, modes 0 and 1).
    4. In PyTorch: d CB into d B and d C, the exponents' gradients summed per position and
       back through the running sum into d dt and d A.
    """
    s = _Prep(x, dt, A, B, C, chunk_size)
    bsz, length, nh, nc, q, ng = s.bsz, s.length, s.nheads, s.nchunks, s.q, s.ngroups
    dev = x.device
    dy = dy.contiguous()  # y's dtype: the kernels read it in the operand dtype of their matmuls

    entering, _ = s.states(initial_state)
    d_states, d_init, d_decay = s.state_grads(dy, entering, d_final)

    dx = torch.empty(bsz, length, nh, s.head_dim, dtype=s.op, device=dev)
    ddt = torch.empty(bsz, length, nh, dtype=torch.float32, device=dev)
    k.chunk_dx_kernel[(bsz * nc, nh, q // s.tile)](
        s.x, *s.sx, s.dt, s.acs, s.cb, s.B, *s.sb, d_states, dy, dx, ddt, nc, length,
        nh, s.rep, ng, q, s.head_dim, s.d_state, s.tile, s.tile, s.bp, min(s.bn, 128),
        s.dot_prec, s.upcast, num_warps=s.warps,
    )  # fmt: skip

    # One program per tile and group loops over the group's heads; where that leaves too few
    # programs to fill the GPU, the heads are split among a few programs whose float32 partial sums
    # (a few [chunk, chunk] matrices per group, not per head) are added. Heads wider than 64 spill
    # at 64 x 64 tiles in this kernel: half the tile there.
    tile = s.tile if s.head_dim <= 64 else min(s.tile, 32)
    nt = q // tile
    splits = head_splits(bsz * nc * ng * nt * (nt + 1) // 2, s.rep)
    dcb = torch.zeros((splits, *s.cb.shape), dtype=torch.float32, device=dev)
    row = torch.zeros(bsz * nc, nh, nt, q, dtype=torch.float32, device=dev)
    col = torch.zeros_like(row)
    k.chunk_cb_backward_kernel[(bsz * nc, ng * splits, nt * nt)](
        s.x, *s.sx, s.dt, s.acs, s.cb, dy, dcb, row, col, nc, length, s.cb.numel(),
        nh, s.rep, s.rep // splits, ng, q, s.head_dim, tile, tile, s.bp,
        s.dot_prec, s.upcast, num_warps=8 if tile == 64 else 4,
    )  # fmt: skip
    dcb_sum = dcb.sum(0)

    # B and C's gradients through the states, and the exponents' gradients that come with them.
    br = head_sum_rows(q, s.d_state, s.op)
    hs_splits = head_splits(bsz * nc * ng * (q // br), s.rep)
    d_c = torch.empty(hs_splits, bsz, length, ng, s.d_state, dtype=torch.float32, device=dev)
    d_b = torch.empty_like(d_c)
    d_exp_c = torch.empty(bsz, length, nh, dtype=torch.float32, device=dev)
    d_exp_b = torch.empty_like(d_exp_c)
    for mode, u, v, w, out, rowdot in (
        (0, dy, entering, s.C, d_c, d_exp_c),
        (1, s.x, d_states, s.B, d_b, d_exp_b),
    ):
        u, *su = _rows(u)
        w, *sw = _rows(w)
        k.head_sum_kernel[(bsz * nc, ng * hs_splits, q // br)](
            u, *su, s.dt, s.acs, v, w, *sw, out, rowdot, nc, length, out[0].numel(),
            nh, s.rep, s.rep // hs_splits, ng, q, s.head_dim, s.d_state, br, s.bp, s.bn,
            mode, s.dot_prec, s.upcast, num_warps=4 if br == 32 else 8,
        )  # fmt: skip

    # d CB [b, c, g, l, s] into B and C (small per-group matmuls, float32).
    Cc = s.C.view(bsz, nc, q, ng, s.d_state).float()
    Bc = s.B.view(bsz, nc, q, ng, s.d_state).float()
    dC = d_c.sum(0) + torch.einsum("bcgls,bcsgn->bclgn", dcb_sum, Bc).reshape(bsz, length, ng, s.d_state)
    dB = d_b.sum(0) + torch.einsum("bcgls,bclgn->bcsgn", dcb_sum, Cc).reshape(bsz, length, ng, s.d_state)

    # The exponents' gradients, per position of each head's running sum [b, h, c, Q].
    def per_chunk(t: torch.Tensor) -> torch.Tensor:  # [b, L, h] -> [b, h, c, Q]
        return t.view(bsz, nc, q, nh).permute(0, 3, 1, 2)

    d_exp_b = per_chunk(d_exp_b)
    d_acs = (row.sum(2) - col.sum(2)).view(bsz, nc, nh, q).permute(0, 2, 1, 3) + per_chunk(d_exp_c) - d_exp_b
    d_end = d_exp_b.sum(-1) + d_decay  # cs[Q-1] of each chunk: the state's decay to the chunk end
    d_acs = torch.cat([d_acs[..., :-1], d_acs[..., -1:] + d_end[..., None]], dim=-1)
    # Back through the running sum (a reversed cumulative sum) to each step's log-decay dt * A.
    d_a = d_acs.flip(-1).cumsum(-1).flip(-1).permute(0, 2, 3, 1).reshape(bsz, length, nh)
    d_dt = ddt + d_a * A.float()
    d_A = (d_a * s.dt).sum((0, 1))
    return dx, d_dt, d_A.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), d_init


@torch.library.custom_op("viaduct::ssd_scan_backward", mutates_args=())
def ssd_scan_backward_op(
    dy: torch.Tensor,
    d_final: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `ssd_scan_op`'s x, dt, A, B, C and initial state (zeros' worth if it had none)."""
    dx, d_dt, d_A, dB, dC, d_init = _backward(dy, d_final, x, dt, A, B, C, initial_state, chunk_size)
    return dx, d_dt, d_A, dB.contiguous(), dC.contiguous(), d_init


@ssd_scan_backward_op.register_fake
def _(
    dy: torch.Tensor, d_final: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    b, _, h, p = x.shape
    f32 = torch.float32
    return (
        x.new_empty(x.shape),
        dt.new_empty(dt.shape, dtype=f32),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        x.new_empty((b, h, p, B.shape[3]), dtype=f32),
    )


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor | None,
        int,
        torch.dtype,
    ],
    output: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, dt, A, B, C, initial_state, chunk_size, out_dtype = inputs
    ctx.save_for_backward(x, dt, A, B, C, initial_state)  # type: ignore[arg-type]  # None is saved as None
    ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
    ctx.out_dtype = out_dtype  # type: ignore[attr-defined]
    ctx.has_initial = initial_state is not None  # type: ignore[attr-defined]


def _autograd_backward(
    ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor | None, d_final: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, dt, A, B, C, initial_state = ctx.saved_tensors  # type: ignore[attr-defined]
    if dy is None:
        dy = torch.zeros(x.shape, dtype=ctx.out_dtype, device=x.device)  # type: ignore[attr-defined]
    dx, d_dt, d_A, dB, dC, d_init = ssd_scan_backward_op(
        dy,
        d_final,
        x,
        dt,
        A,
        B,
        C,
        initial_state,
        ctx.chunk_size,  # type: ignore[attr-defined]
    )
    return dx, d_dt, d_A, dB, dC, (d_init if ctx.has_initial else None), None, None  # type: ignore[attr-defined]


ssd_scan_op.register_autograd(_autograd_backward, setup_context=_setup_context)
