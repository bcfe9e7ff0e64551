"""Triton kernels of the fused SSD scan (`viaduct.models.mamba.ssd_triton` launches them).

Notation (one batch row b, one chunk c of Q positions, one head h of group g):

    cs[l]      running sum of the head's log-decays dt * A over the chunk (float32, `ACS`)
    xdt[s]     x[s] * dt[s], rounded to the operand dtype before every matmul
    CB[l, s]   C[l] . B[s] of the group (`CB`, computed once per chunk and group)
    S          the state entering the chunk [P, N] (carried in float32, stored in the operand dtype)

    y[l]   = exp(cs[l]) C[l] S^T  +  sum_{s <= l} CB[l, s] exp(cs[l] - cs[s]) xdt[s]
    S_next = exp(cs[Q-1]) S  +  sum_s exp(cs[Q-1] - cs[s]) xdt[s] B[s]^T

Every program works on one chunk of one batch row (program id 0 is b * chunks + c). Tensors of
positions ([b, L, ...]: x, dt, B, C, y, dy) are addressed by their strides, so views from the mixer
need no copies; per-chunk tensors (running sums, CB, states) are contiguous. Matmul operands are in
the inputs' dtype (bf16 on a GPU) with float32 accumulation; decays, and the states while they are
carried from chunk to chunk, stay float32, as Mamba-2's reference kernels keep them. The states go
to memory in the operand dtype, the dtype every matmul reads them in. No kernel writes a
[chunk, chunk] matrix per head to memory.
"""

from __future__ import annotations

import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32 (operands in the op dtype; UPCAST: as float32, for Triton's CPU
    interpreter, which multiplies bf16 blocks as raw bits)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _tile(base, rows, stride, cols, width):
    """The [rows, cols] tile at base + row * stride + col, columns from `width` on read as 0 (the
    rows of a per-position tensor: its positions, and a head's or group's channels)."""
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=cols[None, :] < width, other=0.0)


@triton.jit
def _state_t(base, offs_p, offs_n, P, N):
    """A row-major [P, N] state at base, read transposed as [len(offs_n), len(offs_p)]."""
    mask = (offs_p[None, :] < P) & (offs_n[:, None] < N)
    return tl.load(base + offs_p[None, :] * N + offs_n[:, None], mask=mask, other=0.0)


@triton.jit
def _chunk_outer(
    U,
    su_b,
    su_l,
    su_h,
    DT,
    a_base,
    V,
    sv_b,
    sv_l,
    sv_g,
    b,
    c,
    h,
    g,
    L,
    offs_p,
    offs_n,
    H: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BL: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """sum over chunk c's rows l of (U[l, p] * scale[l]) V[l, n], a [BP, BN] float32 block: with
    MODE 0 (U = x, V = B, scale = dt exp(cs[Q-1] - cs)) the state the chunk adds from zero, with
    MODE 1 (U = dy, V = C, scale = exp(cs)) the gradient its outputs send to its entering state."""
    cs_end = tl.load(a_base + Q - 1)
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for l0 in range(0, Q, BL):
        t = c * Q + l0 + tl.arange(0, BL)
        cs = tl.load(a_base + l0 + tl.arange(0, BL))
        if MODE == 0:
            scale = tl.load(DT + (b * L + t) * H + h) * tl.exp(cs_end - cs)
        else:
            scale = tl.exp(cs)
        u = _tile(U + b * su_b + h * su_h, t, su_l, offs_p, P)
        v = _tile(V + b * sv_b + g * sv_g, t, sv_l, offs_n, N)
        us = (u.to(tl.float32) * scale[:, None]).to(v.dtype)
        acc += _mm(tl.trans(us), v, DOT_PREC, UPCAST)
    return acc


@triton.jit
def state_forward_kernel(
    X,  # x [b, L, h, P], strided
    sx_b,
    sx_l,
    sx_h,
    DT,  # time steps [b, L, h] float32, contiguous
    ACS,  # running sums [b, h, NC, Q] float32
    B,  # [b, L, g, N], strided
    sb_b,
    sb_l,
    sb_g,
    INIT,  # the state before the first chunk [b, h, P, N] float32 (read if HAS_INIT)
    ENT,  # out: the state entering each chunk [b, NC, h, P, N] (its dtype)
    FINAL,  # out: the state after the last chunk [b, h, P, N] float32
    NC,
    L,
    H: tl.constexpr,
    R: tl.constexpr,  # heads per group
    Q: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BL: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    HAS_INIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block [BP, BN] of one head's state, carried over the chunks of one batch row in
    registers: S_in(0) = INIT, S_in(c + 1) = exp(cs_c[Q-1]) S_in(c) + (the state chunk c adds).
    One kernel for both steps: the chunks' own states never go to memory, and the loop's
    latency hides behind each chunk's matmul."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_p = tl.program_id(1) * BP + tl.arange(0, BP)
    offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    block = offs_p[:, None] * N + offs_n[None, :]
    if HAS_INIT:
        state = tl.load(INIT + (b * H + h) * P * N + block, mask=mask, other=0.0)
    else:
        state = tl.zeros([BP, BN], dtype=tl.float32)
    for c in range(0, NC):
        a_base = ACS + ((b * H + h) * NC + c) * Q
        own = _chunk_outer(
            X, sx_b, sx_l, sx_h, DT, a_base, B, sb_b, sb_l, sb_g, b, c, h, h // R, L, offs_p, offs_n,
            H, Q, P, N, BL, BP, BN, 0, DOT_PREC, UPCAST,
        )  # fmt: skip
        tl.store(ENT + ((b * NC + c) * H + h) * P * N + block, state.to(ENT.dtype.element_ty), mask=mask)
        state = tl.exp(tl.load(a_base + Q - 1)) * state + own
    tl.store(FINAL + (b * H + h) * P * N + block, state, mask=mask)


@triton.jit
def state_backward_kernel(
    DY,  # gradient of y [b, L, h, P] (y's dtype), contiguous
    DT,  # [b, L, h] float32 (unused by this mode of `_chunk_outer`; any pointer)
    ACS,  # [b, h, NC, Q]
    C,  # [b, L, g, N], strided
    sc_b,
    sc_l,
    sc_g,
    ENT,  # the states entering the chunks [b, NC, h, P, N]
    DFINAL,  # gradient of the final state [b, h, P, N] float32 (read if HAS_DFINAL)
    DST,  # out: gradient of each chunk's own state [b, NC, h, P, N] (its dtype)
    DINIT,  # out: gradient of the initial state [b, h, P, N] float32
    DDECAY,  # out: partial sums of the gradient of each chunk's log-decay [b, h, NC, blocks]
    NC,
    L,
    H: tl.constexpr,
    R: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BL: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The state pass backwards for one block of one head's state, over the chunks in reverse:
    G(NC) = DFINAL; chunk c's own state gets G(c + 1); G(c) = (what chunk c's outputs send to its
    entering state) + exp(A_c) G(c + 1); d A_c = exp(A_c) sum(G(c + 1) * S_in(c)), A_c = cs_c[Q-1]."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    blk = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    nblocks = tl.num_programs(1) * tl.num_programs(2)
    offs_p = tl.program_id(1) * BP + tl.arange(0, BP)
    offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    block = offs_p[:, None] * N + offs_n[None, :]
    if HAS_DFINAL:
        grad = tl.load(DFINAL + (b * H + h) * P * N + block, mask=mask, other=0.0)
    else:
        grad = tl.zeros([BP, BN], dtype=tl.float32)
    for i in range(0, NC):
        c = NC - 1 - i
        a_base = ACS + ((b * H + h) * NC + c) * Q
        direct = _chunk_outer(
            DY, L * H * P, H * P, P, DT, a_base, C, sc_b, sc_l, sc_g, b, c, h, h // R, L, offs_p, offs_n,
            H, Q, P, N, BL, BP, BN, 1, DOT_PREC, UPCAST,
        )  # fmt: skip
        at = ((b * NC + c) * H + h) * P * N + block
        tl.store(DST + at, grad.to(DST.dtype.element_ty), mask=mask)
        decay = tl.exp(tl.load(a_base + Q - 1))
        entering = tl.load(ENT + at, mask=mask, other=0.0).to(tl.float32)
        d_decay = decay * tl.sum(tl.sum(grad * entering, axis=1), axis=0)
        tl.store(DDECAY + ((b * H + h) * NC + c) * nblocks + blk, d_decay)
        grad = direct + decay * grad
    tl.store(DINIT + (b * H + h) * P * N + block, grad, mask=mask)


@triton.jit
def chunk_scan_kernel(
    X,  # x [b, L, h, P], strided
    sx_b,
    sx_l,
    sx_h,
    DT,  # [b, L, h] float32
    ACS,  # [b, h, NC, Q]
    CB,  # [b, NC, g, Q, Q] (the operand dtype)
    C,  # [b, L, g, N], strided
    sc_b,
    sc_l,
    sc_g,
    ENT,  # states entering the chunks [b, NC, h, P, N]
    Y,  # out [b, L, h, P] (out_dtype), contiguous
    NC,
    L,
    H: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BL: tl.constexpr,
    BS: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y for one block of rows l of one head: the entering state read through C, plus the chunk's
    own inputs weighted by CB and the decays (column blocks up to the diagonal only)."""
    bc = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    l0 = tl.program_id(2) * BL
    b = bc // NC
    c = bc % NC
    g = h // R
    offs_l = l0 + tl.arange(0, BL)
    t_l = c * Q + offs_l
    offs_p = tl.arange(0, BP)
    p_ok = offs_p < P
    a_base = ACS + ((b * H + h) * NC + c) * Q
    cs_l = tl.load(a_base + offs_l)

    acc = tl.zeros([BL, BP], dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        cm = _tile(C + b * sc_b + g * sc_g, t_l, sc_l, offs_n, N)
        st = _state_t(ENT + (bc * H + h) * P * N, offs_p, offs_n, P, N)
        acc += _mm(cm, st.to(cm.dtype), DOT_PREC, UPCAST)
    acc = acc * tl.exp(cs_l)[:, None]

    cb_base = CB + (bc * G + g) * Q * Q
    # Column blocks up to the diagonal: the weights above it are zero. (A constant trip count with a
    # uniform branch: Triton's CPU interpreter cannot take a tensor as a range bound.)
    for s0 in range(0, Q, BS):
        if s0 < l0 + BL:
            offs_s = s0 + tl.arange(0, BS)
            t_s = c * Q + offs_s
            sc = tl.load(cb_base + offs_l[:, None] * Q + offs_s[None, :]).to(tl.float32)
            cs_s = tl.load(a_base + offs_s)
            # The clamp keeps the entries above the diagonal (masked next) from overflowing.
            decay = tl.exp(tl.minimum(cs_l[:, None] - cs_s[None, :], 0.0))
            w = tl.where(offs_l[:, None] >= offs_s[None, :], sc * decay, 0.0)
            xs = _tile(X + b * sx_b + h * sx_h, t_s, sx_l, offs_p, P)
            dts = tl.load(DT + (b * L + t_s) * H + h)
            xdt = (xs.to(tl.float32) * dts[:, None]).to(xs.dtype)
            acc += _mm(w.to(xs.dtype), xdt, DOT_PREC, UPCAST)
    tl.store(
        Y + ((b * L + t_l[:, None]) * H + h) * P + offs_p[None, :],
        acc.to(Y.dtype.element_ty),
        mask=p_ok[None, :],
    )


@triton.jit
def chunk_dx_kernel(
    X,  # x [b, L, h, P], strided
    sx_b,
    sx_l,
    sx_h,
    DT,  # [b, L, h] float32
    ACS,  # [b, h, NC, Q]
    CB,  # [b, NC, g, Q, Q]
    B,  # [b, L, g, N], strided
    sb_b,
    sb_l,
    sb_g,
    DST,  # gradient of each chunk's own state [b, NC, h, P, N]
    DY,  # [b, L, h, P] (y's dtype), contiguous
    DX,  # out [b, L, h, P] in x's dtype, contiguous
    DDT,  # out [b, L, h] float32: the time step's gradient through xdt
    NC,
    L,
    H: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BL: tl.constexpr,
    BS: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """d xdt[s] = sum_{l >= s} CB[l, s] exp(cs[l] - cs[s]) dy[l] + exp(cs[Q-1] - cs[s]) B[s] dS^T
    for one block of positions s of one head; from it d x = d xdt * dt and d dt = d xdt . x."""
    bc = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s0 = tl.program_id(2) * BS
    b = bc // NC
    c = bc % NC
    g = h // R
    offs_s = s0 + tl.arange(0, BS)
    t_s = c * Q + offs_s
    offs_p = tl.arange(0, BP)
    p_ok = offs_p < P
    a_base = ACS + ((b * H + h) * NC + c) * Q
    cs_s = tl.load(a_base + offs_s)
    cs_end = tl.load(a_base + Q - 1)
    xs = _tile(X + b * sx_b + h * sx_h, t_s, sx_l, offs_p, P)
    op = xs.dtype

    acc = tl.zeros([BS, BP], dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        bm = _tile(B + b * sb_b + g * sb_g, t_s, sb_l, offs_n, N)
        dst = _state_t(DST + (bc * H + h) * P * N, offs_p, offs_n, P, N)
        acc += _mm(bm, dst.to(bm.dtype), DOT_PREC, UPCAST)
    acc = acc * tl.exp(cs_end - cs_s)[:, None]

    cb_base = CB + (bc * G + g) * Q * Q
    # Row blocks from the diagonal down (anti-causal): the weights are zero for l < s.
    for l0 in range(0, Q, BL):
        if l0 + BL > s0:
            offs_l = l0 + tl.arange(0, BL)
            t_l = c * Q + offs_l
            # The transposed tile [s, l], read straight from the row-major CB.
            sc_t = tl.load(cb_base + offs_l[None, :] * Q + offs_s[:, None]).to(tl.float32)
            cs_l = tl.load(a_base + offs_l)
            decay_t = tl.exp(tl.minimum(cs_l[None, :] - cs_s[:, None], 0.0))
            w_t = tl.where(offs_l[None, :] >= offs_s[:, None], sc_t * decay_t, 0.0)
            dy = _tile(DY + b * L * H * P + h * P, t_l, H * P, offs_p, P)
            acc += _mm(w_t.to(op), dy.to(op), DOT_PREC, UPCAST)
    dts = tl.load(DT + (b * L + t_s) * H + h)
    tl.store(
        DX + ((b * L + t_s[:, None]) * H + h) * P + offs_p[None, :],
        (acc * dts[:, None]).to(DX.dtype.element_ty),
        mask=p_ok[None, :],
    )
    tl.store(DDT + (b * L + t_s) * H + h, tl.sum(acc * xs.to(tl.float32), axis=1))


@triton.jit
def chunk_cb_backward_kernel(
    X,  # x [b, L, h, P], strided
    sx_b,
    sx_l,
    sx_h,
    DT,  # [b, L, h] float32
    ACS,  # [b, h, NC, Q]
    CB,  # [b, NC, g, Q, Q]
    DY,  # [b, L, h, P] (y's dtype), contiguous
    DCB,  # out: [splits, b, NC, g, Q, Q], zero-filled (tiles above the diagonal stay 0)
    ROW,  # out: partial row sums of dM * W [b * NC, h, column blocks, Q] float32
    COL,  # out: partial column sums of dM * W [b * NC, h, row blocks, Q] float32
    NC,
    L,
    DCB_SPLIT,  # elements between the partial sums of DCB over the splits of a group's heads
    H: tl.constexpr,
    R: tl.constexpr,
    RS: tl.constexpr,  # heads per split (a divisor of R)
    G: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
    BS: tl.constexpr,
    BP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Per group and tile (l, s) on or below the diagonal, looping over the group's heads:
    dM = dy xdt^T (the gradient of the weights W = CB * decay), d CB = sum over heads of dM * decay
    (one program owns each tile: no atomics), and the tile's row and column sums of dM * W, the
    gradient of the decay's exponent cs[l] - cs[s], as partial sums per block (deterministic)."""
    bc = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) // (R // RS)
    split = tl.program_id(1) % (R // RS)
    NSB: tl.constexpr = Q // BS
    NLB: tl.constexpr = Q // BL
    lb = tl.program_id(2) // NSB
    sb = tl.program_id(2) % NSB
    l0 = lb * BL
    s0 = sb * BS
    # Tiles wholly above the diagonal have zero weights and zero gradients: nothing to do.
    if s0 < l0 + BL:
        b = bc // NC
        c = bc % NC
        offs_l = l0 + tl.arange(0, BL)
        offs_s = s0 + tl.arange(0, BS)
        t_l = c * Q + offs_l
        t_s = c * Q + offs_s
        offs_p = tl.arange(0, BP)
        causal = offs_l[:, None] >= offs_s[None, :]
        tile = (bc * G + g) * Q * Q + offs_l[:, None] * Q + offs_s[None, :]
        sc = tl.load(CB + tile).to(tl.float32)
        dcb = tl.zeros([BL, BS], dtype=tl.float32)
        for r in range(RS):
            h = g * R + split * RS + r
            a_base = ACS + ((b * H + h) * NC + c) * Q
            cs_l = tl.load(a_base + offs_l)
            cs_s = tl.load(a_base + offs_s)
            diff = cs_l[:, None] - cs_s[None, :]
            decay = tl.exp(tl.minimum(diff, 0.0))
            dy = _tile(DY + b * L * H * P + h * P, t_l, H * P, offs_p, P)
            xs = _tile(X + b * sx_b + h * sx_h, t_s, sx_l, offs_p, P)
            xdt = (xs.to(tl.float32) * tl.load(DT + (b * L + t_s) * H + h)[:, None]).to(xs.dtype)
            dm = _mm(dy.to(xs.dtype), tl.trans(xdt), DOT_PREC, UPCAST)
            dm_decay = tl.where(causal, dm * decay, 0.0)
            dcb += dm_decay
            # The exponent's gradient is dM * W where the clamp at 0 lets it through (torch's clamp
            # passes the gradient where the value is <= the bound).
            d_exp = tl.where(diff <= 0.0, dm_decay * sc, 0.0)
            tl.store(ROW + ((bc * H + h) * NSB + sb) * Q + offs_l, tl.sum(d_exp, axis=1))
            tl.store(COL + ((bc * H + h) * NLB + lb) * Q + offs_s, tl.sum(d_exp, axis=0))
        tl.store(DCB + split * DCB_SPLIT + tile, dcb.to(DCB.dtype.element_ty))


@triton.jit
def head_sum_kernel(
    U,  # per-position rows [b, L, h, P] (dy, or x), strided
    su_b,
    su_l,
    su_h,
    DT,  # [b, L, h] float32
    ACS,  # [b, h, NC, Q]
    V,  # per-chunk states [b, NC, h, P, N] (entering states, or own-state gradients)
    W,  # per-position group rows [b, L, g, N] (C, or B), strided
    sw_b,
    sw_l,
    sw_g,
    OUT,  # out: [splits, b, L, g, N] float32
    ROWDOT,  # out: [b, L, h] float32
    NC,
    L,
    OUT_SPLIT,
    H: tl.constexpr,
    R: tl.constexpr,
    RS: tl.constexpr,
    G: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BR: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,  # N up to a power of two: a program holds whole rows of N
    MODE: tl.constexpr,  # 0: exp(cs) (dy, entering, C); 1: dt exp(cs[Q-1] - cs) (x, dS, B)
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """For one block of rows of one group, summed over (a split of) its heads:
    M_h = (U_h * scale_h) V_h [rows, N], OUT = sum_h M_h, and per head ROWDOT = sum_n W * M_h.

    MODE 0 gives C's gradient through the entering state and (ROWDOT) the exponent cs[l]'s;
    MODE 1 gives B's gradient through the chunk's own state and (ROWDOT) the gradient of the decay
    exponent cs[Q-1] - cs[s] of that state."""
    bc = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) // (R // RS)
    split = tl.program_id(1) % (R // RS)
    r0 = tl.program_id(2) * BR
    b = bc // NC
    c = bc % NC
    offs_r = r0 + tl.arange(0, BR)
    t = c * Q + offs_r
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    p_ok = offs_p < P
    n_ok = offs_n < N
    w = _tile(W + b * sw_b + g * sw_g, t, sw_l, offs_n, N)
    op = w.dtype
    acc = tl.zeros([BR, BN], dtype=tl.float32)
    for i in range(RS):
        h = g * R + split * RS + i
        a_base = ACS + ((b * H + h) * NC + c) * Q
        cs = tl.load(a_base + offs_r)
        if MODE == 0:
            scale = tl.exp(cs)
        else:
            scale = tl.load(DT + (b * L + t) * H + h) * tl.exp(tl.load(a_base + Q - 1) - cs)
        u = _tile(U + b * su_b + h * su_h, t, su_l, offs_p, P)
        v = tl.load(
            V + ((bc * H + h) * P + offs_p[:, None]) * N + offs_n[None, :],
            mask=p_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        m = _mm((u.to(tl.float32) * scale[:, None]).to(op), v.to(op), DOT_PREC, UPCAST)
        acc += m
        tl.store(ROWDOT + (b * L + t) * H + h, tl.sum(m * w.to(tl.float32), axis=1))
    out = OUT + split * OUT_SPLIT + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :]
    tl.store(out, acc, mask=n_ok[None, :])
