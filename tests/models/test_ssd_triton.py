"""The fused Triton SSD scan (forward and backward) against the PyTorch path and the recurrence.

The kernel tests run on CUDA where it is available (marked `gpu`) and on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1`, with Triton importable); elsewhere they are skipped. The dispatch
tests need neither.

    PYTHONPATH=/path/to/triton TRITON_INTERPRET=1 pytest -q tests/models/test_ssd_triton.py   # CPU
    pytest -q -m gpu tests/models/test_ssd_triton.py                                        # GPU
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from viaduct.models.mamba import ssd
from viaduct.models.mamba.ssd import ssd_backend, ssd_chunked, ssd_recurrence
from viaduct.testing.kernels import HAS_TRITON, TRITON_DEVICES, relative_error

DEVICES = TRITON_DEVICES


def _scan_inputs(
    bsz: int,
    length: int,
    groups: int,
    rep: int,
    head_dim: int,
    d_state: int,
    device: str,
    *,
    decay: float = 1.0,
    initial: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor | None]:
    """x, dt, A, B, C (x, B, C in `dtype`) and an optional initial state, as the mixer makes them:
    x, B and C are views into one projection (strided, as the mixer's split leaves them)."""
    heads = groups * rep
    width = heads * head_dim + 2 * groups * d_state
    proj = torch.randn(bsz, length, width, device=device).to(dtype)
    x = proj[..., : heads * head_dim].unflatten(-1, (heads, head_dim))
    B, C = proj[..., heads * head_dim :].unflatten(-1, (2, groups, d_state)).unbind(2)
    dt = F.softplus(torch.randn(bsz, length, heads, device=device) - 1.0)
    A = -decay * torch.linspace(0.2, 2.0, heads, device=device)
    init = torch.randn(bsz, heads, head_dim, d_state, device=device) if initial else None
    return [x, dt, A, B / d_state**0.25, C / d_state**0.25, init]


def _run(inputs: list[torch.Tensor | None], chunk: int, backend: str):
    """y, the final state and the gradients of every input (for fixed output gradients) by `backend`."""
    args = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with ssd_backend(backend):
        y, state = ssd_chunked(*args[:5], chunk_size=chunk, initial_state=args[5])
    gen = torch.Generator(device=y.device).manual_seed(1)
    dy = torch.randn(y.shape, generator=gen, device=y.device)
    dstate = torch.randn(state.shape, generator=gen, device=y.device)
    used = [t for t in args if t is not None]
    grads = torch.autograd.grad((y.float() * dy).sum() + (state * dstate).sum(), used)
    return y.detach().float(), state.detach(), grads


# (batch, length, groups, heads per group, head_dim, d_state, chunk, log-decay scale, initial state)
SHAPES = [
    (1, 64, 1, 2, 16, 16, 32, 1.0, False),
    (2, 80, 2, 2, 24, 20, 32, 1.0, True),  # padding, two groups, head and state no powers of two
    (1, 96, 1, 3, 32, 40, 32, 8.0, False),  # strong decays; two state blocks
    (1, 64, 2, 1, 16, 16, 16, 0.5, True),
    (1, 128, 1, 2, 48, 16, 64, 1.0, False),  # two tiles a side
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scan_matches_torch_float32(shape: tuple, device: str) -> None:
    bsz, length, groups, rep, head_dim, d_state, chunk, decay, initial = shape
    torch.manual_seed(0)
    inputs = _scan_inputs(bsz, length, groups, rep, head_dim, d_state, device, decay=decay, initial=initial)
    y, state, grads = _run(inputs, chunk, "triton")
    y_t, state_t, grads_t = _run(inputs, chunk, "torch")
    # Both against float64 (the two float32 paths sum in different orders): the kernels at least
    # about as close as the PyTorch path.
    y_x, state_x, grads_x = _run([None if t is None else t.double() for t in inputs], chunk, "torch")
    assert y.shape == y_t.shape and state.shape == state_t.shape
    names = [n for n, t in zip("x dt A B C initial".split(), inputs) if t is not None]
    for name, got, ref, want in zip(
        ["y", "state", *names], [y, state, *grads], [y_t, state_t, *grads_t], [y_x, state_x, *grads_x]
    ):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        assert relative_error(got, want) < max(2 * relative_error(ref, want), 1e-5), (
            name,
            relative_error(got, want),
            relative_error(ref, want),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_scan_with_heads_split_among_programs(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where one program per tile would leave the GPU idle, a group's heads are split among a few
    # programs whose partial gradients are summed.
    from viaduct.models.mamba import kernel_shapes

    monkeypatch.setattr(kernel_shapes, "MIN_PROGRAMS", 8)
    torch.manual_seed(0)
    inputs = _scan_inputs(1, 64, 1, 4, 16, 16, device)
    _, _, grads = _run(inputs, 32, "triton")
    _, _, grads_t = _run(inputs, 32, "torch")
    for got, want in zip(grads, grads_t):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_precision_is_as_close_as_the_torch_path(dtype: torch.dtype, device: str) -> None:
    # Against a float32 evaluation of the same rounded inputs, the kernels must be about as close as
    # the PyTorch path in the same dtype (they round different intermediates).
    torch.manual_seed(0)
    inputs = _scan_inputs(2, 80, 2, 2, 32, 16, device, initial=True, dtype=dtype)
    exact = _run([None if t is None else t.float() for t in inputs], 32, "torch")
    half_t = _run(inputs, 32, "torch")
    half = _run(inputs, 32, "triton")
    for got, ref, want in zip(
        [half[0], half[1], *half[2]], [half_t[0], half_t[1], *half_t[2]], [exact[0], exact[1], *exact[2]]
    ):
        assert relative_error(got, want) < max(2 * relative_error(ref, want), 2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_scan_matches_recurrence(device: str) -> None:
    torch.manual_seed(0)
    inputs = _scan_inputs(2, 70, 2, 2, 16, 8, device, initial=True)  # 70 positions: the last chunk padded
    with ssd_backend("triton"):
        y, state = ssd_chunked(*inputs[:5], chunk_size=32, initial_state=inputs[5])
    y_ref, state_ref = ssd_recurrence(*[t.double() for t in inputs[:5]], initial_state=inputs[5].double())
    assert relative_error(y, y_ref) < 1e-5 and relative_error(state, state_ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_full_graph_with_kernels(device: str) -> None:
    # The custom ops are opaque to torch.compile: the whole scan, forward and backward, is one graph.
    # The CPU interpreter runs under aot_eager (dynamo and autograd tracing, no code generation).
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in _scan_inputs(1, 64, 1, 4, 16, 16, device)[:5]]

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
    assert relative_error(y, y_t) < 1e-5
    for got, want in zip(grads, grads_t):
        assert relative_error(got, want) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")
@pytest.mark.parametrize("chunk", [128, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mamba_780m_shape_bf16_on_cuda(chunk: int, head_dim: int) -> None:
    # The benchmark's shape (fewer rows): 48 heads of 64 in one group, state 128, bf16; and 128-wide
    # heads. Against a float32 evaluation of the same bf16 inputs.
    torch.manual_seed(0)
    inputs = _scan_inputs(2, 2048, 1, 48 * 64 // head_dim, head_dim, 128, "cuda", dtype=torch.bfloat16)
    exact = _run([None if t is None else t.float() for t in inputs], chunk, "torch")
    half_t = _run(inputs, chunk, "torch")
    half = _run(inputs, chunk, "triton")
    for got, ref, want in zip([half[0], *half[2]], [half_t[0], *half_t[2]], [exact[0], *exact[2]]):
        assert relative_error(got, want) < max(2 * relative_error(ref, want), 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")
def test_auto_uses_kernels_on_cuda() -> None:
    x = torch.zeros(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert ssd.uses_kernels(x, 64, 128)
    with ssd_backend("torch"):
        assert not ssd.uses_kernels(x, 64, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")
def test_compiled_mamba_layer_kernels_match_torch_path() -> None:
    # A whole Mamba-2 layer, bf16 and compiled with fullgraph=True as the benchmark runs it: the
    # kernels' forward and gradients against the PyTorch path's (which checkpoints its scan).
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
    assert relative_error(out, out_t) < 1e-2
    for got, want in zip(grads, grads_t):
        assert relative_error(got, want) < 3e-2


def _small_layer(groups: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Mamba layer 64 wide with heads and states of 16 and chunks of 16 (seeded)."""
    from viaduct.models import MambaModelProvider
    from viaduct.models.mamba.model import MambaLayer

    p = MambaModelProvider(
        num_layers=1,
        hidden_size=64,
        mamba_num_groups=groups,
        mamba_head_dim=16,
        mamba_state_dim=16,
        mamba_chunk_size=16,
        vocab_size=100,
        seq_length=64,
    )
    p.finalize()
    torch.manual_seed(0)
    return MambaLayer(p, 1, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 2])
def test_mamba_layer_kernels_match_torch_path_in_float32(device: str, groups: int) -> None:
    # The mixer's kernel path as a whole (convolution, scan, gated norm with the skip) against its
    # PyTorch path: output and every parameter's gradient, in float32, with groups normalised apart.
    layer = _small_layer(groups, device, torch.float32)
    with torch.no_grad():  # non-trivial norm weights, skip and biases, so their gradients differ
        for name, param in layer.named_parameters():
            if "norm" in name or name.endswith(("D", "bias")):
                param.add_(0.3 * torch.randn_like(param))
    x = torch.randn(2, 40, 64, device=device, requires_grad=True)
    results = []
    for backend in ("triton", "torch"):
        with ssd_backend(backend):
            out = layer(x)
            grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
        results.append((out, grads))
    (out, grads), (out_t, grads_t) = results
    assert relative_error(out, out_t) < 1e-5
    for (name, _), got, want in zip([("x", x), *layer.named_parameters()], grads, grads_t):
        assert relative_error(got, want) < 1e-4, name


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_layer_kernels_in_bf16(device: str) -> None:
    # In bf16 the kernel path hands the scan's output to the norm in bf16 (the PyTorch path keeps it
    # in float32): both against a float32 evaluation of the same bf16 weights and input.
    layer = _small_layer(1, device, torch.bfloat16)
    x = torch.randn(2, 48, 64, device=device, dtype=torch.bfloat16, requires_grad=True)

    def run(backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
        layer.to(dtype)
        xs = x.detach().to(dtype).requires_grad_()
        with ssd_backend(backend):
            out = layer(xs)
            grads = torch.autograd.grad(out.float().square().sum(), [xs, *layer.parameters()])
        return [out, *grads]

    half = run("triton", torch.bfloat16)
    half_t = run("torch", torch.bfloat16)
    exact = run("torch", torch.float32)  # the same values: bf16 widens to float32 exactly
    assert half[0].dtype == torch.bfloat16
    for got, ref, want in zip(half, half_t, exact):
        assert relative_error(got, want) < max(2 * relative_error(ref, want), 2e-2)


def test_kernel_shape_rules() -> None:
    # What the scan's, the convolution's and the norm's kernels take (no Triton needed to ask).
    from viaduct.models.mamba.kernel_shapes import conv_fits, norm_fits, scan_fits

    assert scan_fits(128, 64, 128, torch.bfloat16) and scan_fits(16, 100, 256, torch.float32)
    assert not scan_fits(96, 64, 128, torch.bfloat16) and not scan_fits(8, 64, 128, torch.bfloat16)
    assert not scan_fits(128, 256, 128, torch.bfloat16) and not scan_fits(128, 64, 128, torch.float64)
    assert norm_fits(120, 60, torch.bfloat16) and not norm_fits(120, 50, torch.bfloat16)
    assert not norm_fits(2 * 16384, 16384, torch.float32)
    assert conv_fits(4) and conv_fits(16) and not conv_fits(17) and not conv_fits(0)


def test_auto_runs_the_kernels_from_ampere_on() -> None:
    assert ssd.kernel_capable((8, 0)) and ssd.kernel_capable((9, 0)) and ssd.kernel_capable((12, 1))
    assert not ssd.kernel_capable((7, 5)) and not ssd.kernel_capable((7, 0))


def test_auto_keeps_torch_path_on_cpu() -> None:
    x = torch.zeros(1, 64, 2, 16)
    assert not ssd.uses_kernels(x, 16, 16)


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
    inputs = _scan_inputs(1, 24, 1, 2, 16, 8, "cpu")[:5]
    with ssd_backend("triton"), pytest.raises(ValueError, match="SSD backend 'triton' was forced"):
        ssd_chunked(*inputs, chunk_size=12)
    with ssd_backend("auto"):
        y, _ = ssd_chunked(*inputs, chunk_size=12)
    assert relative_error(y, ssd_recurrence(*inputs)[0]) < 1e-5
