"""The state-space-dual (SSD) scan of Mamba-2, in PyTorch and (on CUDA) as fused Triton kernels.

The selective state space recurrence of one head h (state [head_dim p, d_state n]) is

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T
    y_t     = state_t C_t

with B_t and C_t shared by the heads of a group (head i belongs to group i // (heads / groups), as in
Mamba-2 and its Hugging Face port). `ssd_chunked` computes it without a loop over time: the sequence is
cut into chunks; inside a chunk the output is a masked quadratic ("attention-like") form whose mask is
the decay between every pair of positions (a segment sum of dt * A); across chunks, the states at the
chunk ends are passed on by a short loop over the chunks (or, for many chunks, the same segment-sum
trick over the chunk index). Every step is a batched einsum or elementwise, so torch.compile sees one
static graph per shape. On CUDA, where Triton is importable, the whole scan runs instead as fused
Triton kernels (`viaduct.models.mamba.ssd_triton`, an opaque custom op to the compiler) that never
write a [chunk, chunk] matrix per head to memory and keep only their inputs for backward;
`set_ssd_backend` / `ssd_backend` choose the path. `ssd_recurrence` is the step-by-step loop, the
reference the tests hold the chunked form to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from viaduct.models.mamba.kernel_shapes import scan_fits


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums of `a` [..., T] as a [..., T, T] matrix: out[..., i, j] = a[j+1] + ... + a[i] for
    j <= i (0 on the diagonal) and -inf above it, so exp(out) is the causal decay from j to i.

    Built by a cumulative sum of masked copies rather than as cumsum[i] - cumsum[j]: the difference of
    two long running sums loses precision (and overflows exp above the diagonal before masking).
    """
    t = a.size(-1)
    x = a[..., None].expand(*a.shape, t)  # x[..., i, j] = a[i]
    below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    x = x.masked_fill(~below, 0.0)
    out = x.cumsum(dim=-2)  # out[..., i, j] = sum of a[k] for j < k <= i
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~causal, float("-inf"))


def _check_shapes(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    # Shapes come from the mixer, not from a user's file; a mismatch is a programming error that should
    # name every size at once rather than fail deep inside an einsum.
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    ok = (
        dt.shape == (b, length, h)
        and A.shape == (h,)
        and B.shape == (b, length, g, n)
        and C.shape == (b, length, g, n)
        and h % g == 0
        and (initial_state is None or initial_state.shape == (b, h, p, n))
    )
    if not ok:
        init = None if initial_state is None else tuple(initial_state.shape)
        raise ValueError(
            "SSD scan: expected x [b, l, h, p], dt [b, l, h], A [h], B and C [b, l, g, n] with h a multiple "
            f"of g, initial_state [b, h, p, n]; got x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, initial_state {init}"
        )


# Which implementation computes `ssd_chunked`: "auto" (the fused Triton kernels where the inputs are
# on a CUDA GPU of compute capability 8.0 or newer, Triton is importable and the shape suits them;
# PyTorch otherwise), "torch" (always
# PyTorch: the reference) or "triton" (always the kernels; an error where they cannot run). Read when
# a call is traced, so a compiled model keeps the choice it was compiled with until it recompiles.
SSD_BACKENDS = ("auto", "torch", "triton")
SEQUENTIAL_CHUNKS = 64
"""Chunks up to which the states are passed on by a loop (step 3 of `ssd_chunked`)."""
_backend = "auto"


def set_ssd_backend(backend: str) -> str:
    """Choose the implementation of the scan (one of `SSD_BACKENDS`) for every later call; returns
    the previous choice."""
    global _backend
    if backend not in SSD_BACKENDS:
        raise ValueError(f"SSD backend must be one of {', '.join(SSD_BACKENDS)}; got {backend!r}")
    previous, _backend = _backend, backend
    return previous


@contextlib.contextmanager
def ssd_backend(backend: str) -> Iterator[None]:
    """`set_ssd_backend` for the duration of a `with` block."""
    previous = set_ssd_backend(backend)
    try:
        yield
    finally:
        set_ssd_backend(previous)


MIN_CAPABILITY = (8, 0)
"""The oldest CUDA compute capability "auto" runs the kernels on: Ampere, whose tensor cores take
their bf16 matmuls (they are tested on Hopper); older GPUs keep the PyTorch path."""


def kernel_capable(capability: tuple[int, int]) -> bool:
    """Whether "auto" runs the kernels on a GPU of this compute capability."""
    return tuple(capability) >= MIN_CAPABILITY


@torch.compiler.assume_constant_result
def current_gpu_capable() -> bool:
    """`kernel_capable` of the current CUDA device (where a run keeps its tensors). A constant to
    torch.compile, like `triton_available`."""
    return kernel_capable(torch.cuda.get_device_capability())


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether the Triton kernels can be loaded (Triton importable). A constant to torch.compile, so the
    check is made once and leaves no graph break."""
    try:
        import viaduct.models.mamba.ssd_triton  # noqa: F401
    except ImportError:
        return False
    return True


def uses_kernels(x: torch.Tensor, chunk_size: int, state_dim: int, head_dim: int | None = None) -> bool:
    """Whether `ssd_chunked` runs the fused Triton kernels for inputs like x [b, l, h, p] (which then
    keep only the scan's inputs for backward, so no activation checkpoint is needed around it), or
    for a tensor with x's dtype and device and heads `head_dim` wide. The Mamba mixer runs its
    convolution and gated norm by kernels too exactly where this holds. Raises where the backend is
    forced to "triton" and they cannot run."""
    if _backend == "torch":
        return False
    head_dim = x.shape[-1] if head_dim is None else head_dim
    ready = triton_available()
    if ready and scan_fits(chunk_size, head_dim, state_dim, x.dtype):
        if _backend == "triton" or (x.is_cuda and current_gpu_capable()):
            return True
    if _backend == "triton":
        why = (
            "Triton is not importable"
            if not ready
            else (
                f"chunk {chunk_size} (a power of two >= 16 is needed), head_dim {head_dim} (at most 128), "
                f"state_dim {state_dim} (at most 256) or dtype {x.dtype} (bf16, fp16 or fp32) does not "
                "suit the kernels"
            )
        )
        raise ValueError(f"SSD backend 'triton' was forced but {why}; use 'auto' or 'torch'")
    return False


def _chunk_diag_torch(scores: torch.Tensor, a_cumsum: torch.Tensor, x_dt: torch.Tensor) -> torch.Tensor:
    """Step 1 of `ssd_chunked` in PyTorch, in x_dt's dtype.

    The decay is a difference of the chunk's running sums (short: a chunk is at most a few hundred
    steps), clamped at 0 above the diagonal so that the masked entries cannot overflow (nor give NaN
    gradients); scores, decay and mask fuse into one elementwise pass under torch.compile, but the
    weights are still a [chunk, chunk] matrix per head in memory.
    """
    q, op = x_dt.shape[2], x_dt.dtype
    dtype = torch.promote_types(op, torch.float32)
    decay = torch.exp((a_cumsum[..., :, None] - a_cumsum[..., None, :]).clamp(max=0.0))
    causal = torch.ones(q, q, dtype=torch.bool, device=x_dt.device).tril()
    weights = torch.where(causal, scores[:, :, None].to(dtype) * decay, 0.0).to(op)  # [b, g, r, c, l, s]
    return torch.einsum("bgrcls,bcsgrp->bclgrp", weights, x_dt)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan by chunks.

    Args:
        x: inputs [batch, length, heads, head_dim].
        dt: time steps [batch, length, heads], already through dt_bias and softplus (positive).
        A: the (negative) continuous decay rate of each head [heads].
        B, C: input and output projections [batch, length, groups, d_state]; heads / groups heads
            share one group.
        chunk_size: positions per chunk; any length works (the last chunk is padded with dt = 0,
            which neither decays the state nor adds to it).
        initial_state: the state before the first position [batch, heads, head_dim, d_state].
        out_dtype: y's dtype, if not the computation's. The fused kernels write y in it directly:
            a half-precision y halves the traffic of writing it and of every pass that reads it and
            its gradient (the Mamba mixer's training path asks for x's dtype).

    Returns:
        y [batch, length, heads, head_dim] and the state after the last position
        [batch, heads, head_dim, d_state], both in float32 (float64 inputs stay float64; y in
        out_dtype where that is given): the decays are exponentials of long sums, too coarse in
        half precision. With bf16 or fp16 inputs the matmuls take their operands in that dtype
        (accumulating in float32), the decays and the states passed between chunks stay float32.
    """
    if chunk_size < 1:
        raise ValueError(f"SSD scan: chunk_size must be a positive integer, got {chunk_size}")
    _check_shapes(x, dt, A, B, C, initial_state)
    bsz, length, nheads, head_dim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    dtype = torch.promote_types(x.dtype, torch.float32)

    pad = (-length) % chunk_size
    if uses_kernels(x, chunk_size, d_state):
        return _scan_with_kernels(x, dt, A, B, C, chunk_size, initial_state, pad, out_dtype or dtype)
    nchunks = (length + pad) // chunk_size
    q = chunk_size
    # The matmuls take their operands in the inputs' dtype (bf16 tensor cores on a GPU); decays,
    # states and sums stay in float32, as Mamba-2's reference kernels keep them.
    op = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else dtype

    # Zero padding at the end: dt = 0 there, so the padded steps leave the state as it was.
    dt = F.pad(dt.to(dtype), (0, 0, 0, pad))
    x_dt = F.pad((x.to(dtype) * dt[:, :length, :, None]).to(op), (0, 0, 0, 0, 0, pad))
    B = F.pad(B.to(op), (0, 0, 0, 0, 0, pad)).reshape(bsz, nchunks, q, ngroups, d_state)
    C = F.pad(C.to(op), (0, 0, 0, 0, 0, pad)).reshape(bsz, nchunks, q, ngroups, d_state)

    # Heads split as (group, head-in-group): B and C are used per group without copying them per head.
    # x_dt: [b, c, l, g, r, p]; B, C: [b, c, l, g, n]; a: [b, g, r, c, l] (the log-decay of each step).
    x_dt = x_dt.reshape(bsz, nchunks, q, ngroups, rep, head_dim)
    a = (dt * A.to(dtype)).reshape(bsz, nchunks, q, ngroups, rep).permute(0, 3, 4, 1, 2)
    a_cumsum = a.cumsum(dim=-1)

    # 1. Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) x_s dt_s. The
    # scores are per group, hence small.
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B)  # [b, g, c, l, s]
    y_diag = _chunk_diag_torch(scores, a_cumsum, x_dt)

    # 2. The state each chunk adds by its end (starting from zero): sum_s exp(a_{s+1..end}) B_s x_s dt_s.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum).permute(0, 3, 4, 1, 2)  # [b, c, l, g, r]
    x_end = (x_dt.to(dtype) * decay_to_end[..., None]).to(op)
    chunk_states = torch.einsum("bclgn,bclgrp->bgrcpn", B, x_end).to(dtype)

    # 3. Across chunks: the state entering chunk c is the decayed sum of the initial state and every
    # earlier chunk's contribution. Up to `SEQUENTIAL_CHUNKS` chunks, a loop over the chunks of
    # elementwise steps, which torch.compile fuses into one pass over the states (a few MB a step);
    # beyond, where unrolling would swell the graph, the segment sum over chunk ends as one batched
    # float32 matmul (no tensor cores for its thin [chunk, chunk] blocks: slower on a GPU).
    if initial_state is None:
        start = chunk_states.new_zeros(bsz, ngroups, rep, head_dim, d_state)
    else:
        start = initial_state.to(dtype).reshape(bsz, ngroups, rep, head_dim, d_state)
    if nchunks <= SEQUENTIAL_CHUNKS:
        chunk_decay = torch.exp(a_cumsum[..., -1])[..., None, None]  # [b, g, r, c, 1, 1]
        state, passed = start, []
        for c in range(nchunks):
            passed.append(state)
            state = chunk_decay[:, :, :, c] * state + chunk_states[:, :, :, c]
        entering, final_state = torch.stack(passed, dim=3), state
    else:
        states = torch.cat([start[:, :, :, None], chunk_states], dim=3).flatten(-2)  # [b, g, r, c + 1, p n]
        chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # [b, g, r, c + 1, c + 1]
        states = torch.matmul(chunk_decay, states).unflatten(-1, (head_dim, d_state))
        entering, final_state = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. Each position reads the state that entered its chunk, decayed up to that position.
    decay_from_start = torch.exp(a_cumsum).permute(0, 3, 4, 1, 2)  # [b, c, l, g, r]
    y_off = torch.einsum("bclgn,bgrcpn->bclgrp", C, entering.to(op)).to(dtype) * decay_from_start[..., None]

    y = (y_diag.to(dtype) + y_off).reshape(bsz, nchunks * q, nheads, head_dim)[:, :length]
    return y.to(out_dtype or dtype), final_state.reshape(bsz, nheads, head_dim, d_state)


def _scan_with_kernels(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    pad: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssd_chunked` by the fused Triton kernels: B and C in x's dtype, dt, A and the initial state in
    float32, the positions padded to whole chunks (dt = 0 there) only when they are not; y in
    out_dtype."""
    from viaduct.models.mamba import ssd_triton

    length = x.shape[1]
    dt, A, B, C = dt.float(), A.float(), B.to(x.dtype), C.to(x.dtype)
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    init = None if initial_state is None else initial_state.float()
    y, final_state = ssd_triton.ssd_scan_op(x, dt, A, B, C, init, chunk_size, out_dtype)
    return (y[:, :length] if pad else y), final_state


def ssd_recurrence(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan, one time step after another (the definition; slow, for tests and checks).

    Arguments and results as in `ssd_chunked` (without the chunk size).
    """
    _check_shapes(x, dt, A, B, C, initial_state)
    bsz, length, nheads, head_dim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    # Group i // (heads / groups) serves head i.
    B = B.to(dtype).repeat_interleave(nheads // ngroups, dim=2)
    C = C.to(dtype).repeat_interleave(nheads // ngroups, dim=2)
    state = x.new_zeros(bsz, nheads, head_dim, d_state) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(length):
        step_decay = torch.exp(dt[:, t] * A)[..., None, None]  # [b, h, 1, 1]
        state = step_decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(bsz, 0, nheads, head_dim)
    return y, state
