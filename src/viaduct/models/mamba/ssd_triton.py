"""Step 1 of the SSD scan (the output of each chunk from its own inputs) as fused Triton kernels.

Within a chunk, head h of group g gives

    y[l] = sum_{s <= l} scores[g, l, s] * exp(min(cs[h, l] - cs[h, s], 0)) * x_dt[h, s]

with scores = C B^T of the group and cs the running sum of the head's log-decays over the chunk.
The PyTorch form (`viaduct.models.mamba.ssd._chunk_diag_torch`) builds the weights as a [chunk, chunk]
matrix for every head (and autograd keeps it, and builds its gradient, for backward): at Mamba-2
780M's shape that is about a hundred million elements written and read back several times per
layer. These kernels build each [block, block] tile of the weights in registers from the group's
scores (read once per head, shared through the L2 cache) and the head's two rows of running sums,
and skip the tiles above the diagonal, so nothing of size [chunk, chunk] per head ever reaches
memory, in forward or in backward.

Kernels (every program works on one chunk of one batch row):
    forward       per (head, block of rows l): y = W @ x_dt, over the column blocks s <= l.
    d x_dt        per (head, block of columns s): d x_dt = W^T @ dy, over the row blocks l >= s.
    d scores, d cs per (group, tile (l, s) on or below the diagonal), looping over the group's heads:
                  dM = dy x_dt^T, d scores = sum over heads of dM * decay (no atomics: one program
                  owns each tile), and the tile's row and column sums of dM * W, the gradient of the
                  decay's exponent, written as partial sums per block that a small sum finishes
                  (deterministic, unlike atomics).

Both directions are `torch.library` custom ops with fake (meta) implementations, so torch.compile
treats them as opaque calls inside a full graph and never traces Triton itself.

This module imports Triton at import time; `viaduct.models.mamba.ssd` imports it only where Triton
is importable. With TRITON_INTERPRET=1 the kernels also run on CPU tensors (slowly), which is how the
tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

# The dtypes the kernels take: the matmul operands of the scan (float64 stays on the PyTorch path).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Programs enough to keep an H100's 132 multiprocessors busy (several resident on each).
_MIN_PROGRAMS = 1024
# The widest head the kernels keep in registers (an fp32 [block, head_dim] accumulator per program).
MAX_HEAD_DIM = 128


def supports(chunk: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels handle this shape: a chunk length that is a power of two of at least 16
    (the tiles divide it and tl.dot needs 16 along every side), head_dim up to `MAX_HEAD_DIM` (any
    value: the head is masked up to the next power of two) and a half-precision or float32 dtype."""
    return (
        chunk >= 16
        and chunk & (chunk - 1) == 0
        and 1 <= head_dim <= MAX_HEAD_DIM
        and dtype in SUPPORTED_DTYPES
    )


def _tiles(chunk: int, head_dim: int, dtype: torch.dtype, scores_kernel: bool) -> tuple[int, int, int]:
    """Tile side (rows and columns of the weights), padded head width and warps of a kernel.

    Chosen by compiling for the H100 (sm_90) and reading the registers each program needs: 64 x 64
    tiles over half-precision operands use wgmma with 8 warps and stay in registers (about 160 to 230
    a thread, no spills), except the score-gradient kernel with 128-wide heads and every kernel with
    float32 operands (exact FMA dots), which spill at 64 and take 32 x 32 tiles with 4 warps. Shared
    memory stays under 100 KiB everywhere, well inside the H100's 227 KiB."""
    wide = dtype == torch.float32 or (scores_kernel and head_dim > 64)
    tile = min(chunk, 32 if wide else 64)
    return tile, max(16, triton.next_power_of_2(head_dim)), 8 if tile == 64 else 4


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 operands: exact products, as torch's float32 matmul (TF32 off by default) gives;
    # half-precision operands ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dots(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter multiplies bf16 blocks as their raw bits (NumPy has no bfloat16): there
    # the operands, already rounded to bf16, go to tl.dot as float32, which gives the same products.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32 (operands in the op dtype)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _fwd_kernel(
    S,  # scores [b, g, c, l, s]
    ACS,  # running sums [b, h, c, l], float32
    X,  # x_dt [b, c, l, h, p]
    Y,  # out [b, c, l, h, p], float32
    NC,  # chunks per row
    H: tl.constexpr,
    R: tl.constexpr,  # heads per group
    Q: tl.constexpr,  # chunk length
    P: tl.constexpr,  # head_dim
    BL: tl.constexpr,
    BS: tl.constexpr,
    BP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)  # batch row * NC + chunk (the 64-bit index keeps offsets safe)
    h = tl.program_id(1)
    l0 = tl.program_id(2) * BL
    b = bc // NC
    c = bc % NC
    g = h // R
    offs_l = l0 + tl.arange(0, BL)
    offs_p = tl.arange(0, BP)
    p_ok = offs_p[None, :] < P

    s_base = S + ((b * (H // R) + g) * NC + c) * Q * Q
    a_base = ACS + ((b * H + h) * NC + c) * Q
    x_base = X + bc * Q * H * P + h * P
    cs_l = tl.load(a_base + offs_l)
    acc = tl.zeros([BL, BP], dtype=tl.float32)
    # Column blocks up to the diagonal only: the weights above it are zero. (A constant trip count with
    # a uniform branch rather than a loop bound read from the program id: Triton's CPU interpreter
    # cannot take a tensor as a range bound under NumPy 2, and the chunk has only a few blocks.)
    for s0 in range(0, Q, BS):
        if s0 < l0 + BL:
            offs_s = s0 + tl.arange(0, BS)
            sc = tl.load(s_base + offs_l[:, None] * Q + offs_s[None, :]).to(tl.float32)
            cs_s = tl.load(a_base + offs_s)
            # The clamp keeps the entries above the diagonal (masked next) from overflowing.
            decay = tl.exp(tl.minimum(cs_l[:, None] - cs_s[None, :], 0.0))
            w = tl.where(offs_l[:, None] >= offs_s[None, :], sc * decay, 0.0)
            xs = tl.load(x_base + offs_s[:, None] * (H * P) + offs_p[None, :], mask=p_ok, other=0.0)
            acc += _mm(w.to(xs.dtype), xs, DOT_PREC, UPCAST)
    tl.store(Y + bc * Q * H * P + h * P + offs_l[:, None] * (H * P) + offs_p[None, :], acc, mask=p_ok)


@triton.jit
def _bwd_dx_kernel(
    S,  # scores [b, g, c, l, s]
    ACS,  # running sums [b, h, c, l], float32
    DY,  # gradient of the output [b, c, l, h, p], float32
    DX,  # out: gradient of x_dt [b, c, l, h, p], x_dt's dtype
    NC,
    H: tl.constexpr,
    R: tl.constexpr,
    Q: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
    BS: tl.constexpr,
    BP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s0 = tl.program_id(2) * BS
    b = bc // NC
    c = bc % NC
    g = h // R
    offs_s = s0 + tl.arange(0, BS)
    offs_p = tl.arange(0, BP)
    p_ok = offs_p[None, :] < P

    s_base = S + ((b * (H // R) + g) * NC + c) * Q * Q
    a_base = ACS + ((b * H + h) * NC + c) * Q
    dy_base = DY + bc * Q * H * P + h * P
    cs_s = tl.load(a_base + offs_s)
    acc = tl.zeros([BS, BP], dtype=tl.float32)
    # Row blocks from the diagonal down (anti-causal): W[l, s] is zero for l < s.
    for l0 in range(0, Q, BL):
        if l0 + BL > s0:
            offs_l = l0 + tl.arange(0, BL)
            # The transposed tile W^T [s, l], read straight from the row-major scores.
            sc_t = tl.load(s_base + offs_l[None, :] * Q + offs_s[:, None]).to(tl.float32)
            cs_l = tl.load(a_base + offs_l)
            decay_t = tl.exp(tl.minimum(cs_l[None, :] - cs_s[:, None], 0.0))
            w_t = tl.where(offs_l[None, :] >= offs_s[:, None], sc_t * decay_t, 0.0)
            dy = tl.load(dy_base + offs_l[:, None] * (H * P) + offs_p[None, :], mask=p_ok, other=0.0)
            op = DX.dtype.element_ty
            acc += _mm(w_t.to(op), dy.to(op), DOT_PREC, UPCAST)
    dx = acc.to(DX.dtype.element_ty)
    tl.store(DX + bc * Q * H * P + h * P + offs_s[:, None] * (H * P) + offs_p[None, :], dx, mask=p_ok)


@triton.jit
def _bwd_scores_kernel(
    S,  # scores [b, g, c, l, s]
    ACS,  # running sums [b, h, c, l], float32
    X,  # x_dt [b, c, l, h, p]
    DY,  # gradient of the output [b, c, l, h, p], float32
    DS,  # out: gradient of the scores [splits, b, g, c, l, s], zero-filled (tiles above the diagonal stay 0)
    ROW,  # out: partial row sums of dM * W [b * c, h, column blocks, Q], float32, zero-filled
    COL,  # out: partial column sums of dM * W [b * c, h, row blocks, Q], float32, zero-filled
    NC,
    DS_SPLIT,  # elements between the partial sums of DS over the splits of a group's heads
    H: tl.constexpr,
    R: tl.constexpr,
    RS: tl.constexpr,  # heads per split (a divisor of R)
    Q: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
    BS: tl.constexpr,
    BP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
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
        offs_p = tl.arange(0, BP)
        p_ok = offs_p[None, :] < P
        causal = offs_l[:, None] >= offs_s[None, :]
        s_tile = ((b * (H // R) + g) * NC + c) * Q * Q + offs_l[:, None] * Q + offs_s[None, :]
        sc = tl.load(S + s_tile).to(tl.float32)
        ds = tl.zeros([BL, BS], dtype=tl.float32)
        for r in range(RS):
            h = g * R + split * RS + r
            a_base = ACS + ((b * H + h) * NC + c) * Q
            cs_l = tl.load(a_base + offs_l)
            cs_s = tl.load(a_base + offs_s)
            diff = cs_l[:, None] - cs_s[None, :]
            decay = tl.exp(tl.minimum(diff, 0.0))
            head = bc * Q * H * P + h * P
            dy = tl.load(DY + head + offs_l[:, None] * (H * P) + offs_p[None, :], mask=p_ok, other=0.0)
            xs = tl.load(X + head + offs_s[:, None] * (H * P) + offs_p[None, :], mask=p_ok, other=0.0)
            # dM[l, s] = dy[l] . x_dt[s]: the gradient of the weights.
            dm = _mm(dy.to(xs.dtype), tl.trans(xs), DOT_PREC, UPCAST)
            dm_decay = tl.where(causal, dm * decay, 0.0)
            ds += dm_decay
            # The gradient of the decay's exponent cs_l - cs_s is dM * W where the clamp at 0 lets it
            # through (torch's clamp passes the gradient where the value is <= the bound).
            d_exp = tl.where(diff <= 0.0, dm_decay * sc, 0.0)
            tl.store(ROW + ((bc * H + h) * NSB + sb) * Q + offs_l, tl.sum(d_exp, axis=1))
            tl.store(COL + ((bc * H + h) * NLB + lb) * Q + offs_s, tl.sum(d_exp, axis=0))
        tl.store(DS + split * DS_SPLIT + s_tile, ds.to(DS.dtype.element_ty))


def _layouts(
    scores: torch.Tensor, a_cumsum: torch.Tensor, x_dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Contiguous scores [b, g, c, l, s], running sums [b, h, c, l] and x_dt [b, c, l, h, p] (x_dt
    and the running sums are small next to the weights; the copies happen only if needed) and the
    sizes (b, c, q, g, r, p)."""
    bsz, nchunks, q, ngroups, rep, head_dim = x_dt.shape
    acs = a_cumsum.float().contiguous().view(bsz, ngroups * rep, nchunks, q)
    return scores.contiguous(), acs, x_dt.contiguous(), (bsz, nchunks, q, ngroups, rep, head_dim)


@torch.library.custom_op("viaduct::ssd_chunk_diag", mutates_args=())
def ssd_chunk_diag(scores: torch.Tensor, a_cumsum: torch.Tensor, x_dt: torch.Tensor) -> torch.Tensor:
    """y_diag [b, c, l, g, r, p] in float32 from scores [b, g, c, l, s], a_cumsum [b, g, r, c, l]
    (float32) and x_dt [b, c, l, g, r, p] (scores' dtype)."""
    s, acs, x, (bsz, nchunks, q, ngroups, rep, head_dim) = _layouts(scores, a_cumsum, x_dt)
    nheads = ngroups * rep
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    tile, bp, warps = _tiles(q, head_dim, x.dtype, scores_kernel=False)
    grid = (bsz * nchunks, nheads, q // tile)
    _fwd_kernel[grid](
        s,
        acs,
        x,
        y,
        nchunks,
        nheads,
        rep,
        q,
        head_dim,
        tile,
        tile,
        bp,
        _dot_precision(x.dtype),
        _upcast_dots(x.dtype),
        num_warps=warps,
    )
    return y


@ssd_chunk_diag.register_fake
def _(scores: torch.Tensor, a_cumsum: torch.Tensor, x_dt: torch.Tensor) -> torch.Tensor:
    return x_dt.new_empty(x_dt.shape, dtype=torch.float32)


@torch.library.custom_op("viaduct::ssd_chunk_diag_backward", mutates_args=())
def ssd_chunk_diag_backward(
    dy: torch.Tensor, scores: torch.Tensor, a_cumsum: torch.Tensor, x_dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `ssd_chunk_diag` for scores, a_cumsum and x_dt, in their dtypes and shapes."""
    s, acs, x, (bsz, nchunks, q, ngroups, rep, head_dim) = _layouts(scores, a_cumsum, x_dt)
    nheads = ngroups * rep
    dy = dy.float().contiguous()
    prec, upcast = _dot_precision(x.dtype), _upcast_dots(x.dtype)

    tile, bp, warps = _tiles(q, head_dim, x.dtype, scores_kernel=False)
    dx = torch.empty_like(x)
    _bwd_dx_kernel[(bsz * nchunks, nheads, q // tile)](
        s, acs, dy, dx, nchunks, nheads, rep, q, head_dim, tile, tile, bp, prec, upcast, num_warps=warps
    )

    tile, bp, warps = _tiles(q, head_dim, x.dtype, scores_kernel=True)
    bl = bs = tile

    # One program per tile and group loops over the group's heads (summing d scores without atomics);
    # where that leaves too few programs to fill the GPU, the heads are split among a few programs
    # whose float32 partial sums (a few [chunk, chunk] matrices per group, not per head) are added.
    tiles = bsz * nchunks * ngroups * (q // bl) * (q // bs + 1) // 2
    splits = next((d for d in range(1, rep + 1) if rep % d == 0 and tiles * d >= _MIN_PROGRAMS), rep)
    ds = torch.zeros((splits, *s.shape), dtype=s.dtype if splits == 1 else torch.float32, device=x.device)
    row = torch.zeros(bsz * nchunks, nheads, q // bs, q, dtype=torch.float32, device=x.device)
    col = torch.zeros(bsz * nchunks, nheads, q // bl, q, dtype=torch.float32, device=x.device)
    _bwd_scores_kernel[(bsz * nchunks, ngroups * splits, (q // bl) * (q // bs))](
        s,
        acs,
        x,
        dy,
        ds,
        row,
        col,
        nchunks,
        s.numel(),
        nheads,
        rep,
        rep // splits,
        q,
        head_dim,
        bl,
        bs,
        bp,
        prec,
        upcast,
        num_warps=warps,
    )
    # d cs[l] = sum_s dE[l, s] - sum_s dE[s, l] with dE the gradient of the exponent cs_l - cs_s.
    dcs = row.sum(2) - col.sum(2)  # [b * c, h, q]
    da = dcs.view(bsz, nchunks, ngroups, rep, q).permute(0, 2, 3, 1, 4).contiguous().to(a_cumsum.dtype)
    # Contiguous results, as the fake implementation below promises the compiler.
    return ds.sum(0).to(scores.dtype), da, dx.view(x_dt.shape)


@ssd_chunk_diag_backward.register_fake
def _(
    dy: torch.Tensor, scores: torch.Tensor, a_cumsum: torch.Tensor, x_dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return scores.new_empty(scores.shape), a_cumsum.new_empty(a_cumsum.shape), x_dt.new_empty(x_dt.shape)


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    output: torch.Tensor,
) -> None:
    ctx.save_for_backward(*inputs)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, a_cumsum, x_dt = ctx.saved_tensors  # type: ignore[attr-defined]
    return ssd_chunk_diag_backward(dy, scores, a_cumsum, x_dt)


ssd_chunk_diag.register_autograd(_backward, setup_context=_setup_context)
