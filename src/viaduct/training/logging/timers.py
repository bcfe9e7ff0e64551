"""Megatron-style named timers with log levels, summarised across ranks.

`Timers(log_level, log_option, barrier)` hands out one `Timer` per name. A timer asked for at a
level above the configured `logger.timing_log_level` is a shared do-nothing `DummyTimer`, so the
loop can time fine-grained sections unconditionally and pay nothing when they are not wanted.

Levels (as in Megatron): 0 the step as a whole, 1 once-per-step operations (forward-backward,
optimizer), 2 fine-grained ones. On CUDA, timers of level >= 1 synchronise the device at start and
stop: without that they would measure how long the host took to *queue* the kernels, not how long
the GPU took to run them. Level-0 timers do not synchronise, so they are safe inside a step; read
them where the host waits anyway (at `log_interval`, when the loss comes to the host).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from viaduct.training.config.logger import LoggerConfig

TimingLogOption = Literal["max", "minmax", "all"]


class DummyTimer:
    """Stands in for timers above the configured level; every call is a no-op."""

    name = "dummy"

    def start(self, barrier: bool = False) -> None:
        """Do nothing."""

    def stop(self, barrier: bool = False) -> None:
        """Do nothing."""

    def reset(self) -> None:
        """Do nothing."""

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Always 0.0: the section is not timed at this log level."""
        return 0.0

    @property
    def active(self) -> bool:
        return False


class Timer:
    """Accumulates wall-clock seconds between start() and stop() calls."""

    def __init__(self, name: str, *, synchronize: bool, allow_barrier: bool) -> None:
        self.name = name
        self._synchronize = synchronize
        self._allow_barrier = allow_barrier
        self._elapsed = 0.0
        self._started = False
        self._start_time = 0.0

    def _sync(self, barrier: bool) -> None:
        # Barrier first, so every rank leaves it together and the timer measures the slowest one.
        if barrier and self._allow_barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self._synchronize:
            torch.cuda.synchronize()

    @property
    def active(self) -> bool:
        """True between start() and stop()."""
        return self._started

    def start(self, barrier: bool = False) -> None:
        """Start timing; `barrier=True` waits for every rank first (if the Timers allow barriers)."""
        if self._started:
            raise RuntimeError(f"timer {self.name!r} was started twice without stop()")
        self._sync(barrier)
        self._start_time = time.perf_counter()
        self._started = True

    def stop(self, barrier: bool = False) -> None:
        """Stop timing and add the seconds since start() to the total."""
        if not self._started:
            raise RuntimeError(f"timer {self.name!r} was stopped without start()")
        self._sync(barrier)
        self._elapsed += time.perf_counter() - self._start_time
        self._started = False

    def reset(self) -> None:
        """Forget the accumulated time (a running timer keeps running)."""
        self._elapsed = 0.0

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Seconds accumulated so far (a running timer is read without stopping it for good)."""
        running = self._started
        if running:
            self.stop(barrier=barrier)
        total = self._elapsed
        if reset:
            self.reset()
        if running:
            self.start(barrier=barrier)
        return total


class Timers:
    """Named timers, created on first use, at most `log_level` detail.

    `barrier=False` turns every `start(barrier=True)` / `stop(barrier=True)` request into a plain
    start/stop: it is `logger.barrier_with_L1_time`, and the loop asks for barriers only around
    level-1 timers, as Megatron does.
    """

    MAX_LEVEL = 2

    def __init__(
        self,
        log_level: int,
        log_option: TimingLogOption = "minmax",
        barrier: bool = True,
        *,
        device: torch.device | None = None,
    ) -> None:
        if log_level not in (0, 1, 2):
            raise ValueError(f"timing log level must be 0, 1 or 2 (got {log_level})")
        if log_option not in ("max", "minmax", "all"):
            raise ValueError(f"timing log option must be 'max', 'minmax' or 'all' (got {log_option!r})")
        self.log_level = log_level
        self.log_option: TimingLogOption = log_option
        self.barrier = barrier
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self._cuda = device.type == "cuda"
        self._timers: dict[str, Timer] = {}
        self._levels: dict[str, int] = {}
        self._dummy = DummyTimer()

    @classmethod
    def from_config(cls, cfg: LoggerConfig, device: torch.device | None = None) -> Timers:
        """Timers as `logger.timing_log_level`, `timing_log_option` and `barrier_with_L1_time` say."""
        return cls(cfg.timing_log_level, cfg.timing_log_option, cfg.barrier_with_L1_time, device=device)

    def __call__(self, name: str, log_level: int = 0) -> Timer | DummyTimer:
        """The timer called `name`; a shared dummy when `log_level` is above the configured level."""
        if not 0 <= log_level <= self.MAX_LEVEL:
            raise ValueError(f"timer {name!r}: log_level must be 0, 1 or 2 (got {log_level})")
        if log_level > self.log_level:
            return self._dummy
        timer = self._timers.get(name)
        if timer is None:
            timer = Timer(name, synchronize=self._cuda and log_level >= 1, allow_barrier=self.barrier)
            self._timers[name] = timer
            self._levels[name] = log_level
        elif self._levels[name] != log_level:
            raise ValueError(
                f"timer {name!r} was created at log level {self._levels[name]}, now asked for at {log_level}"
            )
        return timer

    @property
    def names(self) -> list[str]:
        """Names of the real (non-dummy) timers created so far."""
        return list(self._timers)

    def _local_times(self, names: list[str], reset: bool, barrier: bool) -> list[float]:
        # 0.0 means "this rank has no such timer": summaries leave those ranks out.
        return [
            self._timers[n].elapsed(reset=reset, barrier=barrier) if n in self._timers else 0.0 for n in names
        ]

    def _gather(self, names: list[str], reset: bool, barrier: bool) -> list[list[float]]:
        """Per-rank seconds, [rank][name]; a collective when torch.distributed is initialized."""
        local = self._local_times(names, reset, barrier)
        if not (dist.is_available() and dist.is_initialized()) or not names:
            return [local]
        # NCCL only moves CUDA tensors; gloo (and others) take CPU tensors.
        backend = str(dist.get_backend())
        device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )
        mine = torch.tensor(local, dtype=torch.float64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return torch.stack(everyone).cpu().tolist()

    def summarize(
        self, names: list[str], normalizer: float = 1.0, *, reset: bool = True, barrier: bool = False
    ) -> dict[str, tuple[float, float]]:
        """`{name: (min, max)}` seconds per `normalizer` (e.g. per iteration) over the ranks.

        Every rank must call it with the same names when torch.distributed is initialized (it is
        an all_gather). Ranks without a timer of that name are left out of its min and max; names
        no rank timed (dummies) are left out of the result. With `log_option="max"` both values
        are the maximum. Timers are reset unless `reset=False`.
        """
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0 (got {normalizer})")
        table = self._gather(list(names), reset, barrier)
        out: dict[str, tuple[float, float]] = {}
        for i, name in enumerate(names):
            values = [row[i] for row in table if row[i] > 0.0]
            if not values:
                continue
            lo, hi = min(values) / normalizer, max(values) / normalizer
            out[name] = (hi, hi) if self.log_option == "max" else (lo, hi)
        return out

    def summarize_all(
        self, names: list[str], normalizer: float = 1.0, *, reset: bool = True, barrier: bool = False
    ) -> dict[str, list[float]]:
        """`{name: [seconds of rank 0, rank 1, ...]}` per `normalizer` (the "all" log option).

        A collective like `summarize`; a rank without that timer reports 0.0.
        """
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0 (got {normalizer})")
        table = self._gather(list(names), reset, barrier)
        return {
            name: [row[i] / normalizer for row in table]
            for i, name in enumerate(names)
            if any(row[i] > 0.0 for row in table)
        }
