"""Profiling a window of training steps: torch.profiler traces, NVTX ranges, CUDA memory snapshots.

Driven by `ProfilingConfig`. Steps are 1-based: step k is the k-th optimizer step of the
run. The profiled window is the steps `profile_step_start <= k < profile_step_end` (as Megatron's
torch.profiler schedule wait=start-1, warmup=1, active=end-start records them), on the ranks listed in
`profile_ranks`. The window closes when step `profile_step_end - 1` ends: the trace is written and the
memory snapshot dumped then. A run resumed past the window profiles nothing.

The loop drives it::

    profiler = Profiler(cfg.profiling, rank=rank, trace_dir=..., device=device)
    profiler.start_run()                      # before the model is built: memory history starts here
    try:
        for step in range(first, last + 1):
            profiler.step_start(step)
            train_step(...)
            profiler.step_end(step)
    finally:
        profiler.close()                      # writes what it has when the run stops early

With `cfg=None`, or on a rank not in `profile_ranks`, every method does nothing.

With `use_nsys_profiler`, the window is bracketed by cudaProfilerStart/Stop (for
`nsys profile --capture-range=cudaProfilerApi`), autograd ops are emitted as NVTX ranges and each step
of the window gets an NVTX range "step <k>". The CUDA calls go through a `CudaProfilerApi`, which a
caller may replace (a recorder, to check the window logic without a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from viaduct.config import ConfigError, Problem
from viaduct.training.config.profiling import ProfilingConfig

__all__ = ["DEFAULT_TRACE_DIR", "CudaProfilerApi", "Profiler", "memory_snapshot_file", "profiling_problems"]

log = logging.getLogger(__name__)

DEFAULT_TRACE_DIR = "./profile"
"""Where torch.profiler traces go when no trace_dir is given."""

_MEMORY_HISTORY_MAX_ENTRIES = 100_000
"""Allocator events kept (Megatron's value): bounded, so a long run does not grow host memory forever."""


def memory_snapshot_file(path: str, rank: int) -> str:
    """`path` with `_<rank>` inserted before the extension: snapshot.pickle -> snapshot_3.pickle."""
    root, ext = os.path.splitext(path)
    return f"{root}_{rank}{ext}"


def profiling_problems(
    cfg: ProfilingConfig | None, *, device: torch.device | str, world_size: int | None = None
) -> list[Problem]:
    """Settings of `cfg` that cannot do what they say on `device` (paths start with "profiling.")."""
    if cfg is None:
        return []
    cuda = torch.device(device).type == "cuda"
    problems: list[Problem] = []

    def add(field: str, message: str, value: Any, fix: str) -> None:
        problems.append(Problem(f"profiling.{field}", message, value, fix=fix))

    if not cuda:
        where = f"this run's device is {torch.device(device)}"
        if cfg.nvtx_ranges:
            add(
                "nvtx_ranges",
                f"needs CUDA (NVTX ranges annotate GPU timelines); {where}",
                True,
                fix="set profiling.nvtx_ranges=false, or run on a GPU",
            )
        if cfg.use_nsys_profiler:
            add(
                "use_nsys_profiler",
                f"needs CUDA (it starts and stops the CUDA profiler that nsys captures); {where}",
                True,
                fix="set profiling.use_nsys_profiler=false, or run on a GPU",
            )
        if cfg.record_memory_history:
            add(
                "record_memory_history",
                f"needs CUDA (it records the CUDA caching allocator); {where}",
                True,
                fix="set profiling.record_memory_history=false, or run on a GPU",
            )
    # The rules between settings (and the world size) live with the config, where validate() asks them.
    problems += [q.prefixed("profiling") for q in cfg.setting_problems(world_size)]
    return problems


class CudaProfilerApi:
    """The CUDA calls the profiler makes: CUDA profiler start/stop and NVTX ranges (torch.cuda)."""

    def start(self) -> None:
        """cudaProfilerStart: opens nsys's capture range."""
        torch.cuda.profiler.start()

    def stop(self) -> None:
        """cudaProfilerStop: closes nsys's capture range."""
        torch.cuda.profiler.stop()

    def range_push(self, name: str) -> None:
        torch.cuda.nvtx.range_push(name)

    def range_pop(self) -> None:
        torch.cuda.nvtx.range_pop()

    def autograd_ranges(self, record_shapes: bool) -> contextlib.AbstractContextManager[object]:
        """Autograd ops (forward and backward) as NVTX ranges while the returned context is entered."""
        return torch.autograd.profiler.emit_nvtx(record_shapes=record_shapes)


def _record_every_step(step: int) -> torch.profiler.ProfilerAction:
    # A schedule (rather than none) makes torch.profiler mark each step as "ProfilerStep#<n>" in the trace;
    # the window itself is decided by Profiler, which starts and stops the profiler.
    return torch.profiler.ProfilerAction.RECORD


class Profiler:
    """Turns a `ProfilingConfig` into profiler start/stop calls around the training steps.

    Raises `ConfigError` at construction for settings that cannot work on `device` (see
    `profiling_problems`). Everything it starts, `close()` stops; `close()` is idempotent.
    """

    def __init__(
        self,
        cfg: ProfilingConfig | None,
        *,
        rank: int,
        trace_dir: str | None,
        device: torch.device | str,
        world_size: int | None = None,
        cuda_api: CudaProfilerApi | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.cuda = cuda_api if cuda_api is not None else CudaProfilerApi()
        """Where the CUDA profiler and NVTX calls go."""
        problems = profiling_problems(cfg, device=self.device, world_size=world_size)
        if problems:
            raise ConfigError(problems)
        self.cfg = cfg
        self.rank = rank
        self.trace_dir = trace_dir if trace_dir else DEFAULT_TRACE_DIR
        self.enabled = cfg is not None and rank in cfg.profile_ranks
        """Whether this rank profiles anything at all."""
        self.trace_files: list[str] = []
        """torch.profiler traces written so far (one per window)."""
        self.snapshot_file: str | None = None
        """The memory snapshot, once written."""

        self._torch_prof: torch.profiler.profile | None = None
        self._emit_nvtx: contextlib.AbstractContextManager[object] | None = None  # autograd NVTX ranges
        self._cuda_profiler_on = False  # cudaProfilerStart called and not yet stopped
        self._nvtx_depth = 0  # step ranges pushed and not yet popped
        self._recording_memory = False
        self._window_done = False
        self._closed = False

    # -- properties ---------------------------------------------------------------------------
    @property
    def in_window(self) -> bool:
        """Whether the window's profilers are running now."""
        return self._torch_prof is not None or self._emit_nvtx is not None or self._cuda_profiler_on

    def _wants(self, name: str) -> bool:
        return self.enabled and bool(getattr(self.cfg, name))

    # -- run ----------------------------------------------------------------------------------
    def start_run(self) -> None:
        """Call once at setup, before the model is built: starts the allocator's history recording."""
        if self._closed or self._recording_memory or not self._wants("record_memory_history"):
            return
        torch.cuda.memory._record_memory_history(max_entries=_MEMORY_HISTORY_MAX_ENTRIES)
        self._recording_memory = True

    def step_start(self, step: int) -> None:
        """Call before 1-based step `step` runs: opens the window at its first step; pushes an NVTX range."""
        if not self.enabled or self._closed:
            return
        cfg = self.cfg
        assert cfg is not None  # enabled implies a config
        if not self._window_done:
            if step >= cfg.profile_step_end:
                # Resumed past the window: nothing to profile; the memory history would only cost.
                self._window_done = True
                self._stop_memory_history()
            elif step >= cfg.profile_step_start:
                self._enter_window(step)
        if cfg.nvtx_ranges or (cfg.use_nsys_profiler and self._cuda_profiler_on):
            self.cuda.range_push(f"step {step}")
            self._nvtx_depth += 1

    def step_end(self, step: int) -> None:
        """Call after step `step` finished: pops its NVTX range; the window's last step closes the window."""
        if not self.enabled or self._closed:
            return
        cfg = self.cfg
        assert cfg is not None
        if self._nvtx_depth:
            self.cuda.range_pop()
            self._nvtx_depth -= 1
        if not self._window_done and step >= cfg.profile_step_end - 1:
            self._close_window()

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        """An NVTX range around a region (a model part, the optimizer step) when nvtx_ranges is on."""
        if not self._wants("nvtx_ranges") or self._closed:
            yield
            return
        self.cuda.range_push(name)
        try:
            yield
        finally:
            self.cuda.range_pop()

    def close(self) -> None:
        """Stop everything; a window still open writes its trace, pending memory history its snapshot."""
        if self._closed:
            return
        try:
            while self._nvtx_depth:
                self.cuda.range_pop()
                self._nvtx_depth -= 1
            if not self._window_done:
                self._close_window()
            self._stop_memory_history()
        finally:
            self._closed = True

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- window -------------------------------------------------------------------------------
    def _enter_window(self, step: int) -> None:
        cfg = self.cfg
        assert cfg is not None
        if self._torch_prof is not None:
            # Later steps of the window: name the step after the global step (ProfilerStep#<step>).
            self._torch_prof.step_num = step - 1
            self._torch_prof.step()
            return
        if self._emit_nvtx is not None or self._cuda_profiler_on:
            return
        if cfg.use_nsys_profiler:
            # nsys --capture-range=cudaProfilerApi records from here to cudaProfilerStop.
            self.cuda.start()
            self._cuda_profiler_on = True
            log.info("rank %d: CUDA profiler (nsys capture range) started at step %d", self.rank, step)
        if (cfg.nvtx_ranges or cfg.use_nsys_profiler) and not cfg.use_pytorch_profiler:
            # Autograd ops (forward and backward) as NVTX ranges, for Nsight Systems. Not together with
            # torch.profiler: both are autograd profilers and only one can run per thread (the trace
            # holds the ops anyway); the step and region ranges are still pushed.
            ctx = self.cuda.autograd_ranges(cfg.record_shapes)
            ctx.__enter__()
            self._emit_nvtx = ctx
        if cfg.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(
                activities=activities,
                schedule=_record_every_step,
                on_trace_ready=self._write_trace,
                record_shapes=cfg.pytorch_profiler_collect_shapes,
                with_stack=cfg.pytorch_profiler_collect_callstack,
            )
            prof.step_num = step
            prof.start()
            self._torch_prof = prof
            log.info("rank %d: torch.profiler recording from step %d", self.rank, step)

    def _close_window(self) -> None:
        """Stop the window's profilers (writing the trace) and dump the memory snapshot; once."""
        self._window_done = True
        try:
            if self._torch_prof is not None:
                prof, self._torch_prof = self._torch_prof, None
                prof.stop()  # calls _write_trace
            if self._emit_nvtx is not None:
                ctx, self._emit_nvtx = self._emit_nvtx, None
                ctx.__exit__(None, None, None)
            if self._cuda_profiler_on:
                self._cuda_profiler_on = False
                self.cuda.stop()
                log.info("rank %d: CUDA profiler (nsys capture range) stopped", self.rank)
        finally:
            if self._recording_memory:
                self._dump_snapshot()
                self._stop_memory_history()

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        os.makedirs(self.trace_dir, exist_ok=True)
        # <worker>.<span>.pt.trace.json.gz is the name TensorBoard's profiler plugin groups by worker;
        # Perfetto and chrome://tracing open it as well.
        path = os.path.join(self.trace_dir, f"rank-{self.rank}.{time.time_ns()}.pt.trace.json.gz")
        prof.export_chrome_trace(path)
        self.trace_files.append(path)
        log.info("rank %d: wrote torch.profiler trace %s", self.rank, path)

    def _dump_snapshot(self) -> None:
        cfg = self.cfg
        assert cfg is not None
        path = memory_snapshot_file(cfg.memory_snapshot_path, self.rank)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        torch.cuda.memory._dump_snapshot(path)
        self.snapshot_file = path
        log.info("rank %d: wrote CUDA memory snapshot %s", self.rank, path)

    def _stop_memory_history(self) -> None:
        if self._recording_memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False
