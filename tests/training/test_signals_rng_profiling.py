"""Signal handling, RNG seeding/state and the step-window profiler, with real signals, files and traces."""

from __future__ import annotations

import functools
import gzip
import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from viaduct.config import ConfigError
from viaduct.training.config.profiling import ProfilingConfig
from viaduct.training.profiling import Profiler, memory_snapshot_file, profiling_problems
from viaduct.training.rng import derive_seed, get_rng_state, set_random_seed, set_rng_state
from viaduct.training.signals import DistributedSignalHandler, any_rank_received, worker_ignore_signal

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------- signals


def test_handler_records_real_signal_and_restores_previous() -> None:
    seen: list[int] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with DistributedSignalHandler(signal.SIGUSR1) as handler:
            assert handler.installed and not handler.received()
            assert any_rank_received(handler) is False  # no process group: the local flag
            os.kill(os.getpid(), signal.SIGUSR1)
            assert handler.received() and handler.count == 1
            assert any_rank_received(handler) is True
            assert seen == []  # only recorded, the previous handler is not called
        assert not handler.installed
        assert signal.getsignal(signal.SIGUSR1) is previous
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        assert handler.count == 1  # released: no longer counting
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_install_release_idempotent_and_reinstall_clears() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    handler = DistributedSignalHandler(int(signal.SIGUSR2))
    assert handler.sig is signal.SIGUSR2
    assert handler.release() is False
    handler.install().install()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert handler.received()
    assert handler.release() is True and handler.release() is False
    assert signal.getsignal(signal.SIGUSR2) == before
    handler.install()
    assert not handler.received()
    handler.release()


def _training_child(ready: mp.synchronize.Event, out: mp.Queue) -> None:
    # The shape of the real loop: a step is never interrupted; the flag is checked between steps.
    with DistributedSignalHandler(signal.SIGTERM) as handler:
        ready.set()
        steps = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.01)  # one "step"
            steps += 1
            if handler.received():
                break
        out.put((steps, handler.received()))


@pytest.mark.slow
def test_child_process_exits_cleanly_after_sigterm() -> None:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_training_child, args=(ready, out))
    proc.start()
    try:
        assert ready.wait(15), "child never installed its handler"
        time.sleep(0.05)  # let it run a few steps
        os.kill(proc.pid, signal.SIGTERM)
        steps, received = out.get(timeout=15)
        proc.join(15)
    finally:
        if proc.is_alive():
            proc.kill()
    assert received and steps >= 1
    assert proc.exitcode == 0  # without the handler SIGTERM would give -15


class _SigtermDisposition(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)


def test_worker_ignore_signal_in_dataloader_workers() -> None:
    loader = torch.utils.data.DataLoader(
        _SigtermDisposition(),
        num_workers=1,
        worker_init_fn=functools.partial(worker_ignore_signal, signal.SIGTERM),
    )
    assert [int(x) for x in loader] == [1, 1]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process is untouched


def _gloo_rank(rank: int, world: int, init_file: str, out: mp.Queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with DistributedSignalHandler(signal.SIGUSR1) as handler:
            first = any_rank_received(handler, dist.group.WORLD)
            if rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            second = any_rank_received(handler)
        out.put((rank, first, second, handler.received()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_any_rank_received_over_gloo(tmp_path: Path) -> None:
    # fork, not spawn: the ranks only run gloo on the host, and re-importing torch twice would cost seconds.
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, 2, str(tmp_path / "init"), out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    # Only rank 1 got the signal; both ranks see it after the all-reduce.
    assert results == [(0, False, True, False), (1, False, True, True)]


# ---------------------------------------------------------------------------------------------- rng


def _draws() -> tuple[float, float, list[float], list[float]]:
    cuda = torch.rand(2, device="cuda").tolist() if torch.cuda.is_available() else []
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), cuda


def test_same_seed_same_draws_and_rank_offsets() -> None:
    assert set_random_seed(1234) == 1234
    a = _draws()
    set_random_seed(1234)
    assert _draws() == a
    assert set_random_seed(1234, pp_rank=2, dp_rank=3) == 1434  # dp offset only with random init
    b = _draws()
    assert b != a
    assert set_random_seed(1234, pp_rank=2, dp_rank=3, data_parallel_random_init=True) == 1464
    assert derive_seed(1234, pp_rank=2, dp_rank=3, data_parallel_random_init=True) == 1464
    set_random_seed(1434)
    assert _draws() == b  # the offset seed is exactly what was used


def test_bad_seed_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"rng\.seed: must be a positive integer"):
        set_random_seed(0)
    with pytest.raises(ConfigError, match="exceeds 2\\*\\*32 - 1"):
        set_random_seed(2**32 - 50, pp_rank=1)


def test_rng_state_round_trips_through_weights_only_file(tmp_path: Path) -> None:
    set_random_seed(77)
    _draws()
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    state = get_rng_state()
    expected = (_draws(), random.gauss(0, 1), float(np.random.standard_normal()))

    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    set_random_seed(999)  # move every generator elsewhere
    _draws()
    set_rng_state(loaded)
    assert (_draws(), random.gauss(0, 1), float(np.random.standard_normal())) == expected


# ---------------------------------------------------------------------------------------------- profiling


def _matmul_loop(profiler: Profiler, steps: range) -> None:
    x = torch.randn(16, 16)
    profiler.start_run()
    try:
        for step in steps:
            profiler.step_start(step)
            x = torch.tanh(x @ x)
            profiler.step_end(step)
    finally:
        profiler.close()


def _trace_events(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def test_trace_written_for_window_on_profiling_rank_only(tmp_path: Path) -> None:
    cfg = ProfilingConfig(
        use_pytorch_profiler=True, profile_step_start=3, profile_step_end=5, profile_ranks=[1]
    )
    cfg.finalize()
    outside = tmp_path / "rank0"
    quiet = Profiler(cfg, rank=0, trace_dir=str(outside), device=CPU, world_size=2)
    _matmul_loop(quiet, range(1, 8))
    assert not quiet.enabled and not outside.exists()

    inside = tmp_path / "rank1"
    prof = Profiler(cfg, rank=1, trace_dir=str(inside), device=CPU, world_size=2)
    x = torch.randn(16, 16)
    for step in range(1, 8):
        prof.step_start(step)
        assert prof.in_window == (3 <= step < 5)
        x = x @ x
        prof.step_end(step)
        if step == 4:  # the window closes when its last step ends
            assert len(list(inside.glob("rank-1.*.pt.trace.json.gz"))) == 1
    prof.close()
    files = list(inside.iterdir())
    assert [f.name for f in files] == [Path(p).name for p in prof.trace_files]
    names = {e.get("name") for e in _trace_events(str(files[0]))}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= names  # steps named after the global step
    assert not {"ProfilerStep#2", "ProfilerStep#5"} & names
    assert "aten::mm" in names


def test_run_stopping_inside_window_still_writes_trace(tmp_path: Path) -> None:
    cfg = ProfilingConfig(
        use_pytorch_profiler=True,
        profile_step_start=2,
        profile_step_end=10,
        pytorch_profiler_collect_shapes=True,
    )
    prof = Profiler(cfg, rank=0, trace_dir=str(tmp_path), device=CPU)
    _matmul_loop(prof, range(1, 4))  # stops at step 3, long before profile_step_end
    prof.close()  # idempotent
    (trace,) = prof.trace_files
    mm = [e for e in _trace_events(trace) if e.get("name") == "aten::mm"]
    assert mm and "Input Dims" in mm[0].get("args", {})  # collect_shapes reached the profiler


def test_resumed_past_window_profiles_nothing(tmp_path: Path) -> None:
    cfg = ProfilingConfig(use_pytorch_profiler=True, profile_step_start=2, profile_step_end=4)
    prof = Profiler(cfg, rank=0, trace_dir=str(tmp_path / "t"), device=CPU)
    _matmul_loop(prof, range(4, 7))
    assert prof.trace_files == [] and not (tmp_path / "t").exists()


def test_default_trace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ProfilingConfig(use_pytorch_profiler=True, profile_step_start=1, profile_step_end=2)
    prof = Profiler(cfg, rank=0, trace_dir=None, device=CPU)
    _matmul_loop(prof, range(1, 3))
    assert len(list((tmp_path / "profile").glob("rank-0.*.pt.trace.json.gz"))) == 1


def test_cuda_only_settings_fail_on_cpu_with_field_paths() -> None:
    cfg = ProfilingConfig(
        nvtx_ranges=True,
        record_memory_history=True,
        pytorch_profiler_collect_callstack=True,
        profile_ranks=[4],
    )
    with pytest.raises(ConfigError) as err:
        Profiler(cfg, rank=0, trace_dir=None, device=CPU, world_size=2)
    paths = [p.path for p in err.value.problems]
    assert paths == [
        "profiling.nvtx_ranges",
        "profiling.record_memory_history",
        "profiling.pytorch_profiler_collect_callstack",
        "profiling.profile_ranks",
    ]
    text = str(err.value)
    assert "needs CUDA" in text and "fix: set profiling.nvtx_ranges=false" in text
    # Shapes in NVTX ranges need the NVTX ranges.
    shapes = profiling_problems(ProfilingConfig(record_shapes=True), device="cuda")
    assert [p.path for p in shapes] == ["profiling.record_shapes"]
    assert profiling_problems(ProfilingConfig(nvtx_ranges=True, record_shapes=True), device="cuda") == []
    # emit_nvtx (for the shapes) and torch.profiler are both autograd profilers: one per thread.
    both = ProfilingConfig(nvtx_ranges=True, record_shapes=True, use_pytorch_profiler=True)
    assert [p.path for p in profiling_problems(both, device="cuda")] == ["profiling.record_shapes"]


def test_none_config_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    prof = Profiler(None, rank=0, trace_dir=None, device=CPU)
    assert not prof.enabled
    _matmul_loop(prof, range(1, 20))
    with prof.range("anything"):
        pass
    assert list(tmp_path.iterdir()) == [] and prof.trace_files == []


def test_memory_snapshot_file_name() -> None:
    assert memory_snapshot_file("snapshot.pickle", 3) == "snapshot_3.pickle"
    assert memory_snapshot_file("/a.b/snap", 0) == "/a.b/snap_0"


def _cuda_loop(prof: Profiler, steps: range) -> None:
    cuda = torch.device("cuda")
    prof.start_run()
    x = torch.randn(64, 64, device=cuda, requires_grad=True)
    try:
        for step in steps:
            prof.step_start(step)
            with prof.range("forward"):
                loss = (x @ x).square().sum()
            loss.backward()
            prof.step_end(step)
    finally:
        prof.close()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_trace_with_nvtx_ranges_and_memory_snapshot(tmp_path: Path) -> None:
    cfg = ProfilingConfig(
        use_pytorch_profiler=True,
        nvtx_ranges=True,
        record_memory_history=True,
        memory_snapshot_path=str(tmp_path / "mem" / "snapshot.pickle"),
        profile_step_start=2,
        profile_step_end=4,
    )
    prof = Profiler(cfg, rank=0, trace_dir=str(tmp_path / "trace"), device="cuda")
    _cuda_loop(prof, range(1, 6))
    assert prof.snapshot_file == str(tmp_path / "mem" / "snapshot_0.pickle")
    assert os.path.getsize(prof.snapshot_file) > 0
    (trace,) = prof.trace_files
    events = _trace_events(trace)
    assert "kernel" in {e.get("cat") for e in events}  # CUDA activity was recorded
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= {e.get("name") for e in events}


@pytest.mark.gpu
@needs_cuda
def test_cuda_nsys_style_emit_nvtx_with_shapes(tmp_path: Path) -> None:
    cfg = ProfilingConfig(nvtx_ranges=True, record_shapes=True, profile_step_start=2, profile_step_end=3)
    prof = Profiler(cfg, rank=0, trace_dir=str(tmp_path), device="cuda")
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    seen = []
    with prof:
        prof.start_run()
        for step in range(1, 5):
            prof.step_start(step)
            seen.append(prof.in_window)  # emit_nvtx is entered over the window only
            with prof.range("forward"):
                loss = (x @ x).square().sum()
            loss.backward()
            prof.step_end(step)
    assert seen == [False, True, False, False]
    assert prof.trace_files == [] and prof.snapshot_file is None and list(tmp_path.iterdir()) == []
