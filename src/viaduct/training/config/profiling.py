"""`profiling`: torch.profiler traces, nsys capture ranges, NVTX ranges and memory snapshots."""

from dataclasses import dataclass, field
from typing import ClassVar

from viaduct.config import ConfigBase, Problem, Problems, unsupported
from viaduct.training.config._checks import positive


@dataclass(kw_only=True)
class ProfilingConfig(ConfigBase):
    """Profile steps profile_step_start to profile_step_end on the ranks in profile_ranks."""

    _component_: ClassVar[str] = "profiling"

    use_pytorch_profiler: bool = False
    """Record a torch.profiler trace of the profiled steps (viewable in TensorBoard or Perfetto)."""

    profile_step_start: int = 10
    """First profiled step."""

    profile_step_end: int = 12
    """Step at which profiling stops."""

    profile_ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks that profile; empty profiles none."""

    pytorch_profiler_collect_shapes: bool = False
    """Record tensor shapes in the PyTorch profiler trace."""

    pytorch_profiler_collect_callstack: bool = False
    """Record Python call stacks in the PyTorch profiler trace."""

    record_memory_history: bool = False
    """Record the allocator's history from setup on and dump a memory snapshot at profile_step_end."""

    memory_snapshot_path: str = "snapshot.pickle"
    """File of the memory snapshot; _<rank> is inserted before the extension."""

    record_shapes: bool = False
    """Record tensor shapes in NVTX ranges."""

    nvtx_ranges: bool = False
    """Annotate steps and model regions with NVTX ranges."""

    use_nsys_profiler: bool = False
    """Start/stop the CUDA profiler around the profiled steps, for nsys --capture-range=cudaProfilerApi."""

    pytorch_profiler_collect_chakra: bool = unsupported("Chakra execution traces", default=False)
    """Also record a Chakra execution trace."""

    def finalize(self) -> None:
        """Check the step window, the ranks and the profiler choice."""
        p = Problems()
        if self.use_pytorch_profiler and self.use_nsys_profiler:
            p.add(
                "use_nsys_profiler",
                "the nsys and PyTorch profilers exclude each other",
                True,
                fix="set one of profiling.use_nsys_profiler / profiling.use_pytorch_profiler to false",
            )
        positive(p, self, "profile_step_start", zero_ok=True)
        positive(p, self, "profile_step_end", zero_ok=True)
        start, end = self.profile_step_start, self.profile_step_end
        if start >= 0 and end >= 0 and end < start:
            p.add(
                "profile_step_end",
                f"({end}) is before profile_step_start ({start})",
                end,
                fix="set profiling.profile_step_end >= profiling.profile_step_start",
            )
        bad = [r for r in self.profile_ranks if r < 0]
        if bad:
            p.add(
                "profile_ranks",
                "ranks are >= 0",
                bad,
                fix="list only non-negative ranks in profiling.profile_ranks",
            )
        if self.record_memory_history and not self.memory_snapshot_path.strip():
            p.add(
                "memory_snapshot_path",
                "is empty",
                self.memory_snapshot_path,
                fix="set profiling.memory_snapshot_path to a file name",
            )
        p.extend(self.setting_problems())
        p.raise_if_any()

    def setting_problems(self, world_size: int | None = None) -> list[Problem]:
        """Settings that cannot do what they say whatever the device; the ranks need `world_size`.

        finalize() asks it without the world size, ConfigContainer.validate() with it, and the
        profiler at setup adds only what depends on the device (CUDA). Paths are relative.
        """
        p = Problems()
        if self.record_shapes and not (self.nvtx_ranges or self.use_nsys_profiler):
            p.add(
                "record_shapes",
                "only adds shapes to NVTX ranges, and neither profiling.nvtx_ranges nor "
                "profiling.use_nsys_profiler is on",
                True,
                fix="set profiling.nvtx_ranges=true or profiling.use_nsys_profiler=true, or use "
                "profiling.pytorch_profiler_collect_shapes for torch.profiler traces",
            )
        if self.record_shapes and self.nvtx_ranges and self.use_pytorch_profiler:
            p.add(
                "record_shapes",
                "needs autograd's NVTX emitter, which cannot run while torch.profiler records "
                "(one autograd profiler per thread)",
                True,
                fix="use profiling.pytorch_profiler_collect_shapes for the torch.profiler trace, or set "
                "profiling.use_pytorch_profiler=false for an nsys run",
            )
        for name in ("pytorch_profiler_collect_shapes", "pytorch_profiler_collect_callstack"):
            if getattr(self, name) and not self.use_pytorch_profiler:
                p.add(
                    name,
                    "applies to torch.profiler traces, and profiling.use_pytorch_profiler is false",
                    True,
                    fix="set profiling.use_pytorch_profiler=true, or leave this setting false",
                )
        wants_something = (
            self.use_pytorch_profiler
            or self.use_nsys_profiler
            or self.nvtx_ranges
            or self.record_memory_history
        )
        if world_size is not None and wants_something and self.profile_ranks:
            missing = sorted(r for r in self.profile_ranks if r >= world_size)
            if missing:
                p.add(
                    "profile_ranks",
                    f"ranks {missing} do not exist: the world size is {world_size}",
                    list(self.profile_ranks),
                    fix=f"list ranks below {world_size} in profiling.profile_ranks",
                )
        return p.items
