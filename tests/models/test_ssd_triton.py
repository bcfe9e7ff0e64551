"""The fused Triton kernels of the SSD scan's within-chunk step against the PyTorch path.

The kernel tests run on CUDA where it is available (marked `gpu`) and on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1`, with Triton importable); elsewhere they are skipped. The dispatch
tests need neither.

    PYTHONPATH=/path/to/triton TRITON_INTERPRET=1 pytest -q tests/models/test_ssd_triton.py   # CPU
    pytest -q -m gpu tests/models/test_ssd_triton.py                                        # GPU
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from viaduct.models.mamba import ssd
from viaduct.models.mamba.ssd import ssd_backend, ssd_chunked, ssd_recurrence

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Each kernel test runs on every device that can run the kernels.
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (_HAS_TRITON and _INTERPRET), reason="needs Triton and TRITON_INTERPRET=1 on the CPU"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not (_HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA"
            ),
        ],
    ),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _step_inputs(
    bsz: int,
    nchunks: int,
    q: int,
    groups: int,
    rep: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    decay: float,
    pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [b, g, c, l, s], a_cumsum [b, g, r, c, l] and x_dt [b, c, l, g, r, p] as `ssd_chunked`
    makes them; the last `pad` positions of the last chunk have a log-decay of 0 (the padding)."""
    n = 16
    C = torch.randn(bsz, nchunks, q, groups, n, device=device).to(dtype)
    B = torch.randn(bsz, nchunks, q, groups, n, device=device).to(dtype)
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B) / n**0.5
    a = -decay * torch.rand(bsz, groups, rep, nchunks, q, device=device)
    if pad:
        a[..., -1, q - pad :] = 0.0
    x_dt = torch.randn(bsz, nchunks, q, groups, rep, head_dim, device=device).to(dtype)
    return scores.detach(), a.cumsum(-1), x_dt


# (batch, chunks, chunk, groups, heads per group, head_dim, log-decay per step at most, padding)
SHAPES = [
    (1, 2, 16, 1, 1, 16, 0.5, 0),
    (2, 2, 32, 1, 3, 16, 0.5, 5),
    (1, 3, 32, 2, 2, 64, 4.0, 0),  # strong decays: exp of the unclamped differences overflows
    (1, 1, 64, 2, 2, 16, 0.2, 17),
    (1, 1, 128, 1, 2, 48, 1.0, 0),  # a head_dim that is no power of two; two tiles a side
]


def _check_step(shape: tuple[int, ...], dtype: torch.dtype, device: str, tol: float) -> None:
    from viaduct.models.mamba.ssd_triton import ssd_chunk_diag

    bsz, nchunks, q, groups, rep, head_dim, decay, pad = shape
    torch.manual_seed(0)
    inputs = _step_inputs(bsz, nchunks, q, groups, rep, head_dim, dtype, device, float(decay), int(pad))
    ref_in = [t.clone().requires_grad_() for t in inputs]
    tri_in = [t.clone().requires_grad_() for t in inputs]
    ref = ssd._chunk_diag_torch(*ref_in).float()
    out = ssd_chunk_diag(*tri_in)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < tol
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_in, dy)
    grads = torch.autograd.grad(out, tri_in, dy)
    for name, got, want, t in zip(("scores", "a_cumsum", "x_dt"), grads, ref_grads, inputs):
        assert got.shape == t.shape and got.dtype == t.dtype, name
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) < tol, (name, _rel(got, want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_matches_torch_float32(shape: tuple[int, ...], device: str) -> None:
    _check_step(shape, torch.float32, device, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_step_with_heads_split_among_programs(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where one program per tile would leave the GPU idle, the heads of a group are split among a few
    # programs (here 2 of 2 heads each) whose partial score gradients are summed.
    from viaduct.models.mamba import ssd_triton

    monkeypatch.setattr(ssd_triton, "_MIN_PROGRAMS", 4)  # 2 tiles (2 chunks of one tile): 2 splits
    _check_step((1, 2, 32, 1, 4, 16, 0.5, 3), torch.float32, device, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_step_matches_torch_half(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    # Both paths round the weights and the matmul operands to the half type; they round different
    # intermediates (the kernels keep dM and the output in float32), hence a relative tolerance.
    _check_step(shape, dtype, device, 2e-2)


def _scan_inputs(
    bsz: int, length: int, heads: int, head_dim: int, groups: int, device: str
) -> list[torch.Tensor]:
    x = torch.randn(bsz, length, heads, head_dim, device=device)
    dt = F.softplus(torch.randn(bsz, length, heads, device=device) - 1.0)
    A = -torch.linspace(0.5, 4.0, heads, device=device)
    B = torch.randn(bsz, length, groups, 8, device=device)
    C = torch.randn(bsz, length, groups, 8, device=device)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


@pytest.mark.parametrize("device", DEVICES)
def test_full_scan_matches_recurrence_and_torch_gradients(device: str) -> None:
    torch.manual_seed(0)
    inputs = _scan_inputs(2, 70, 4, 16, 2, device)  # 70 positions: the last of 3 chunks is padded
    with ssd_backend("triton"):
        y, state = ssd_chunked(*inputs, chunk_size=32)
        grads = torch.autograd.grad((y.square().sum() + state.sum()), inputs)
    y_ref, state_ref = ssd_recurrence(*[t.detach().double() for t in inputs])
    assert _rel(y, y_ref) < 1e-5 and _rel(state, state_ref) < 1e-5
    with ssd_backend("torch"):
        y_t, state_t = ssd_chunked(*inputs, chunk_size=32)
        grads_t = torch.autograd.grad((y_t.square().sum() + state_t.sum()), inputs)
    for name, got, want in zip("x dt A B C".split(), grads, grads_t):
        assert _rel(got, want) < 1e-5, (name, _rel(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_full_graph_with_kernels(device: str) -> None:
    # The custom ops are opaque to torch.compile: the whole scan, forward and backward, is one graph.
    # The CPU interpreter runs under aot_eager (dynamo and autograd tracing, no code generation).
    torch.manual_seed(0)
    inputs = _scan_inputs(1, 64, 4, 16, 1, device)

    def scan(*args: torch.Tensor) -> torch.Tensor:
        return ssd_chunked(*args, chunk_size=16)[0]

    torch._dynamo.reset()
    compiled = torch.compile(scan, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    with ssd_backend("triton"):
        y = compiled(*inputs)
        grads = torch.autograd.grad(y.square().sum(), inputs)
    with ssd_backend("torch"):
        y_t = scan(*inputs)
        grads_t = torch.autograd.grad(y_t.square().sum(), inputs)
    assert _rel(y, y_t) < 1e-5
    for got, want in zip(grads, grads_t):
        assert _rel(got, want) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not (_HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")
@pytest.mark.parametrize("chunk", [128, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mamba_780m_shape_bf16_on_cuda(chunk: int, head_dim: int) -> None:
    # The benchmark's shape (fewer rows): 48 heads of 64 in one group, bf16; and 128-wide heads.
    torch.manual_seed(0)
    nchunks = 2048 // chunk
    inputs = _step_inputs(2, nchunks, chunk, 1, 48 * 64 // head_dim, head_dim, torch.bfloat16, "cuda", 0.3)
    _check_step_inputs_bf16(inputs)


def _check_step_inputs_bf16(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    from viaduct.models.mamba.ssd_triton import ssd_chunk_diag

    # Against a float32 evaluation of the same bf16 inputs: the kernels must be at least as close to it
    # as the bf16 PyTorch path (and close in absolute terms).
    exact_in = [t.float().requires_grad_() for t in inputs]
    exact = ssd._chunk_diag_torch(*exact_in)
    half = ssd._chunk_diag_torch(*inputs).float()
    out = ssd_chunk_diag(*[t.requires_grad_() for t in inputs])
    assert _rel(out, exact) < max(2 * _rel(half, exact), 1e-2)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dy)
    exact_grads = torch.autograd.grad(exact, exact_in, dy)
    for got, want in zip(grads, exact_grads):
        assert _rel(got, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not (_HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")
def test_auto_uses_kernels_on_cuda() -> None:
    # The kernels' output is float32; the PyTorch path's is the operands' dtype.
    scores, acs, x_dt = _step_inputs(1, 2, 64, 1, 2, 64, torch.bfloat16, "cuda", 0.5)
    assert ssd._chunk_diag(scores, acs, x_dt).dtype == torch.float32
    with ssd_backend("torch"):
        assert ssd._chunk_diag(scores, acs, x_dt).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not (_HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")
def test_compiled_mamba_layer_kernels_match_torch_path() -> None:
    # A whole Mamba-2 layer (checkpointed scan inside), bf16 and compiled with fullgraph=True as the
    # benchmark runs it: the kernels' forward and gradients against the PyTorch path's.
    from viaduct.models import MambaModelProvider
    from viaduct.models.mamba.model import MambaLayer

    p = MambaModelProvider(
        num_layers=1,
        hidden_size=512,
        mamba_num_groups=1,
        mamba_head_dim=64,
        mamba_state_dim=128,
        mamba_chunk_size=128,
        vocab_size=1000,
        seq_length=1000,
    )
    p.finalize()
    torch.manual_seed(0)
    layer = MambaLayer(p, 1, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for backend in ("triton", "torch"):
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        with ssd_backend(backend):
            out = compiled(x)
            grads = torch.autograd.grad(out.float().square().sum(), [x, *layer.parameters()])
        results.append((out, grads))
    (out, grads), (out_t, grads_t) = results
    assert _rel(out, out_t) < 1e-2
    for got, want in zip(grads, grads_t):
        assert _rel(got, want) < 3e-2


def test_auto_keeps_torch_path_on_cpu() -> None:
    scores, acs, x_dt = _step_inputs(1, 2, 16, 1, 2, 16, torch.bfloat16, "cpu", 0.5)
    out = ssd._chunk_diag(scores, acs, x_dt)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ssd._chunk_diag_torch(scores, acs, x_dt))


def test_backend_setting_is_checked_and_restored() -> None:
    with pytest.raises(ValueError, match="one of auto, torch, triton"):
        ssd.set_ssd_backend("cuda")
    with ssd_backend("torch"):
        assert ssd._backend == "torch"
        with pytest.raises(RuntimeError):
            with ssd_backend("triton"):
                raise RuntimeError
        assert ssd._backend == "torch"
    assert ssd._backend == "auto"


def test_forced_triton_refuses_what_the_kernels_cannot_run() -> None:
    # A chunk of 12 is no power of two: forced, the kernels are refused with the reason, not run wrong.
    inputs = _scan_inputs(1, 24, 2, 16, 1, "cpu")
    with ssd_backend("triton"), pytest.raises(ValueError, match="SSD backend 'triton' was forced"):
        ssd_chunked(*inputs, chunk_size=12)
    with ssd_backend("auto"):
        y, _ = ssd_chunked(*inputs, chunk_size=12)
    assert _rel(y, ssd_recurrence(*[t.detach() for t in inputs])[0]) < 1e-5
