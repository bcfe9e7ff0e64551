"""Hang detection for training runs (`cfg.ft`): a watchdog thread per rank, and restarts by torchrun.

Every rank's time is split into sections: "setup" (from the start of `pretrain()` to the end of the
first training step, which also compiles and warms up), "step" (each later training iteration),
"checkpointing" (each save) and the time outside any section (logging, evaluation, the exit checks).
A daemon thread checks the time spent in the current section against its timeout. When one runs
over, the rank is hung: it writes the stacks of all its threads to stderr and to
``<checkpoint.save>/ft_hang_rank<r>.txt``, names the section and how long it ran, and ends the process
with exit code `EXIT_CODE_HANG`. Under ``torchrun --max-restarts N`` the elastic agent then stops the
other ranks and starts the job again, which resumes from the latest checkpoint like any viaduct run.

The timeouts are the `ft.*_timeout` fields. With `ft.calc_ft_timeouts` they are learned instead:
the longest duration seen of each section (over all ranks, all runs of this checkpoint directory)
× `SAFETY_FACTOR`, at least `MIN_LEARNED_TIMEOUT`. They are recomputed after every save and at the
end of training and kept in ``<checkpoint.save>/ft_state.json``, so the next run starts with them.
That file is read as untrusted input: bounded in size, checked field by field, ignored with a
warning when damaged.

`ft.simulate_fault` tests all of this: a thread makes one rank hang (its next step blocks) or kills
it (SIGKILL) `simulated_fault_base_delay` seconds (plus up to one second) after the first step. Only
the first attempt of a job injects it, so a restarted job can show that it recovers.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import FaultToleranceConfig

log = logging.getLogger("viaduct")

EXIT_CODE_HANG = 18
"""Exit code of a rank whose watchdog found a hang (the rerun state machine uses 16 and 17)."""

Section = Literal["setup", "step", "checkpointing", "out_of_section"]
SECTIONS: tuple[Section, ...] = ("setup", "step", "checkpointing", "out_of_section")

STATE_FILE = "ft_state.json"
SAFETY_FACTOR = 5.0
"""Learned timeout = longest observed duration × this (a step can be slower now and then)."""
MIN_LEARNED_TIMEOUT = 60.0
"""Learned timeouts never go below this many seconds (short sections still see GC pauses and I/O)."""
MIN_STEPS_TO_LEARN = 16
"""The step timeout is learned only once this many steps were observed (the first are unusual)."""
MAX_TIMEOUT = 7 * 24 * 3600.0
"""Largest timeout or duration accepted from ft_state.json (a week): anything beyond is damage."""
MAX_STATE_BYTES = 64 * 1024
"""ft_state.json is a few hundred bytes; a larger file is not read."""
_STATE_VERSION = 1


def _dump_path(save_dir: Path, rank: int) -> Path:
    return save_dir / f"ft_hang_rank{rank}.txt"


class HangWatchdog:
    """Tracks the current section of one rank and ends the process when it runs past its timeout.

    The main thread calls `enter(name)` / `leave()` (or uses `section(name)`); the watchdog thread only
    reads one tuple the main thread replaces, so neither ever waits for the other.
    """

    def __init__(
        self,
        timeouts: dict[Section, float],
        *,
        rank: int = 0,
        dump_dir: Path | None = None,
        poll_interval: float | None = None,
        exit_code: int = EXIT_CODE_HANG,
        on_hang: Callable[[Section, float, float], None] | None = None,
    ) -> None:
        self.timeouts: dict[Section, float] = dict(timeouts)
        self.rank = rank
        self.dump_dir = dump_dir
        self.exit_code = exit_code
        self.on_hang = on_hang
        """Testing: called instead of dumping and exiting (section, seconds in it, timeout)."""
        shortest = min(self.timeouts.values())
        self.poll_interval = poll_interval if poll_interval is not None else min(1.0, shortest / 10)
        self._current: tuple[Section, float] = ("out_of_section", time.monotonic())
        self.longest: dict[Section, float] = {}
        """The longest finished stretch of each section in seconds (this process only)."""
        self.counts: dict[Section, int] = dict.fromkeys(SECTIONS, 0)
        """How many stretches of each section finished."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ main thread

    def start(self, section: Section = "out_of_section") -> None:
        self._current = (section, time.monotonic())
        self._thread = threading.Thread(target=self._watch, name="viaduct-ft-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None

    @property
    def current(self) -> Section:
        return self._current[0]

    def enter(self, name: Section) -> None:
        """Start section `name`; the time since the last section ended counts as out-of-section time."""
        self._switch(name)

    def leave(self) -> None:
        """End the current section: out-of-section time starts."""
        self._switch("out_of_section")

    @contextlib.contextmanager
    def section(self, name: Section) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def set_timeouts(self, timeouts: dict[Section, float]) -> None:
        self.timeouts = {**self.timeouts, **timeouts}  # one assignment: the watchdog sees old or new

    def _switch(self, name: Section) -> None:
        now = time.monotonic()
        previous, since = self._current
        self.longest[previous] = max(self.longest.get(previous, 0.0), now - since)
        self.counts[previous] += 1
        self._current = (name, now)

    # ------------------------------------------------------------------ watchdog thread

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            name, since = self._current
            timeout = self.timeouts[name]
            elapsed = time.monotonic() - since
            if elapsed > timeout:
                if self.on_hang is not None:
                    self.on_hang(name, elapsed, timeout)
                    return
                self._hang(name, elapsed, timeout)

    def _hang(self, name: Section, elapsed: float, timeout: float) -> None:
        # Plain writes to file descriptors: the hung thread may hold the logging or stderr lock.
        label = "time outside any section" if name == "out_of_section" else f"section {name!r}"
        message = (
            f"[viaduct ft] rank {self.rank}: hang detected: {label} has run {elapsed:.1f} s, over its "
            f"timeout of {timeout:.1f} s (at {time.time():.3f}); stacks of all threads follow; exiting "
            f"with code {self.exit_code} so that torchrun restarts the job\n"
        )
        _write_fd(2, message)
        faulthandler.dump_traceback(file=2, all_threads=True)
        if self.dump_dir is not None:
            path = _dump_path(self.dump_dir, self.rank)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    _write_fd(fd, message)
                    faulthandler.dump_traceback(file=fd, all_threads=True)
                finally:
                    os.close(fd)
                _write_fd(2, f"[viaduct ft] rank {self.rank}: stacks written to {path}\n")
            except OSError as exc:
                _write_fd(2, f"[viaduct ft] rank {self.rank}: could not write {path}: {exc}\n")
        os._exit(self.exit_code)


def _write_fd(fd: int, text: str) -> None:
    data = text.encode("utf-8", "replace")
    while data:
        data = data[os.write(fd, data) :]


# ---------------------------------------------------------------------------------- learned timeouts


def learned_timeouts(
    observed: dict[Section, float], step_count: int, current: dict[Section, float]
) -> dict[Section, float]:
    """The timeouts learned from the longest observed duration of each section (`current` where
    nothing was observed, and for the step until `MIN_STEPS_TO_LEARN` steps were seen)."""
    out = dict(current)
    for name in SECTIONS:
        longest = observed.get(name)
        if longest is None or (name == "step" and step_count < MIN_STEPS_TO_LEARN):
            continue
        out[name] = min(MAX_TIMEOUT, max(MIN_LEARNED_TIMEOUT, longest * SAFETY_FACTOR))
    return out


class FTState:
    """What ft_state.json holds: the learned timeouts and the observations they come from."""

    def __init__(
        self,
        timeouts: dict[Section, float] | None = None,
        observed: dict[Section, float] | None = None,
        step_count: int = 0,
    ) -> None:
        self.timeouts: dict[Section, float] = dict(timeouts or {})
        self.observed: dict[Section, float] = dict(observed or {})
        """Longest duration in seconds seen of each section."""
        self.step_count = step_count
        """Training steps observed in all runs so far."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _STATE_VERSION,
                "timeouts": self.timeouts,
                "observed_max_seconds": self.observed,
                "observed_steps": self.step_count,
            },
            indent=1,
            sort_keys=True,
        )

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of one."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FTState | None:
        """The state in `path`; None when there is none or it is damaged (with a warning)."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("fault tolerance: cannot read %s (%s); using the configured timeouts", path, exc)
            return None
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
            return cls._parse(json.loads(raw.decode("utf-8")))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
            log.warning(
                "fault tolerance: ignoring damaged %s (%s); using the configured timeouts and learning anew",
                path,
                exc,
            )
            return None

    @classmethod
    def _parse(cls, data: object) -> FTState:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {_STATE_VERSION}")
        steps = data.get("observed_steps", 0)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 2**53:
            raise ValueError(f"observed_steps {steps!r} is not a count")
        return cls(
            _seconds(data.get("timeouts", {}), "timeouts", positive=True),
            _seconds(data.get("observed_max_seconds", {}), "observed_max_seconds", positive=False),
            steps,
        )


def _seconds(value: object, key: str, *, positive: bool) -> dict[Section, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not an object")
    out: dict[Section, float] = {}
    for name, seconds in value.items():
        if name not in SECTIONS:
            raise ValueError(f"{key} has an unknown section {name!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError(f"{key}.{name} is not a number")
        low_ok = seconds > 0 if positive else seconds >= 0
        if not (math.isfinite(seconds) and low_ok and seconds <= MAX_TIMEOUT):
            raise ValueError(f"{key}.{name} = {seconds!r} is out of range (0, {MAX_TIMEOUT:.0f}]")
        out[name] = float(seconds)
    return out


# ---------------------------------------------------------------------------------- the run's part


def configured_timeouts(cfg: FaultToleranceConfig) -> dict[Section, float]:
    return {
        "setup": float(cfg.setup_timeout),
        "step": float(cfg.step_timeout),
        "checkpointing": float(cfg.checkpointing_timeout),
        "out_of_section": float(cfg.out_of_section_timeout),
    }


Reduce = Callable[[list[float]], list[float]]
"""Element-wise maximum of a list of floats over all ranks (identity in a single process)."""


class FaultTolerance:
    """`cfg.ft` for one rank of a run: the watchdog, learned timeouts, the simulated fault.

    `pretrain()` creates it first thing (the "setup" section starts), the loop calls `step_start()`,
    `step_end()` and `checkpointing()`, and `close()` stops the watchdog.
    """

    def __init__(self, cfg: FaultToleranceConfig, save_dir: str | os.PathLike[str], *, rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.save_dir = Path(save_dir)
        self.state_path = self.save_dir / STATE_FILE
        timeouts = configured_timeouts(cfg)
        self.previous = FTState()
        if cfg.calc_ft_timeouts:
            loaded = FTState.load(self.state_path)
            if loaded is not None:
                self.previous = loaded
                timeouts.update(loaded.timeouts)
                log.info("fault tolerance: timeouts from %s: %s", self.state_path, _describe(timeouts))
        self.watchdog = HangWatchdog(timeouts, rank=rank, dump_dir=self.save_dir)
        self.watchdog.start("setup")
        self._steps = 0
        self._hang_requested = threading.Event()
        self._fault_thread: threading.Thread | None = None
        self.fault_rank: int | None = None
        """The rank that gets the simulated fault (set by `plan_fault`)."""
        self.fault_type: Literal["rank_hung", "rank_killed"] | None = None
        self.reduce: Reduce | None = None
        """Element-wise maximum over all ranks (set by `connect`; None in a single process)."""

    def connect(self, ctx: DistributedContext) -> None:
        """Use the process group: learned timeouts over all ranks, one agreed simulated fault."""
        self.rank = self.watchdog.rank = ctx.rank
        if ctx.distributed:
            import torch
            import torch.distributed as dist

            def reduce(values: list[float]) -> list[float]:
                t = torch.tensor(values, dtype=torch.float64, device=ctx.host_device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.host_group)
                return t.tolist()

            def choose(values: list[int]) -> list[int]:
                t = torch.tensor(values, dtype=torch.int64, device=ctx.host_device)
                dist.broadcast(t, src=0, group=ctx.host_group)
                return [int(v) for v in t.tolist()]

            self.reduce = reduce
            self.plan_fault(ctx.world_size, choose)
        else:
            self.plan_fault(ctx.world_size)

    # ------------------------------------------------------------------ loop hooks

    def step_start(self) -> None:
        if self._steps > 0:  # the first step stays in "setup": it compiles and warms up
            self.watchdog.enter("step")
        if self._hang_requested.is_set():
            _simulated_hang()

    def step_end(self) -> None:
        self._steps += 1
        if self._steps == 1:
            self.watchdog.leave()  # "setup" ends with the first step
            log.info("fault tolerance: watching for hangs, timeouts %s", _describe(self.watchdog.timeouts))
            self._start_fault_thread()
        else:
            self.watchdog.leave()

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """The "checkpointing" section around a save; learned timeouts are updated after it."""
        outer = self.watchdog.current
        self.watchdog.enter("checkpointing")
        try:
            yield
        finally:
            # A save before the first step must not end "setup"; any other goes back outside sections.
            if outer == "setup":
                self.watchdog.enter("setup")
            else:
                self.watchdog.leave()
        self.update_timeouts()

    def update_timeouts(self) -> None:
        """Learn the timeouts from what all ranks observed (with calc_ft_timeouts); rank 0 writes them.

        Every rank must call it at the same point: it is a collective."""
        if not self.cfg.calc_ft_timeouts:
            return
        longest = self.watchdog.longest
        local = [longest.get(name, -1.0) for name in SECTIONS] + [float(self._steps)]
        merged = self.reduce(local) if self.reduce is not None else local
        prev = self.previous.observed
        observed: dict[Section, float] = {}
        for name, value in zip(SECTIONS, merged):
            best = max(value, prev.get(name, -1.0))
            if best >= 0:
                observed[name] = min(best, MAX_TIMEOUT)
        step_count = self.previous.step_count + int(merged[-1])
        timeouts = learned_timeouts(observed, step_count, self.watchdog.timeouts)
        self.watchdog.set_timeouts(timeouts)
        if self.rank == 0:
            try:
                FTState(timeouts, observed, step_count).save(self.state_path)
            except OSError as exc:
                log.warning("fault tolerance: cannot write %s (%s)", self.state_path, exc)

    def close(self) -> None:
        self.watchdog.stop()

    # ------------------------------------------------------------------ simulated faults

    def plan_fault(self, world_size: int, choose: Callable[[list[int]], list[int]] | None = None) -> None:
        """Decide which rank gets the simulated fault and of which kind (`choose` makes every rank agree
        on rank 0's random draw: a broadcast)."""
        cfg = self.cfg
        if not cfg.simulate_fault:
            return
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            log.info("fault tolerance: restarted job: no simulated fault this time")
            return
        rng = random.Random()
        target = cfg.simulated_fault_rank
        if target is None:
            target = rng.randrange(world_size)
        kind = cfg.simulated_fault_type
        kind_index = ["rank_hung", "rank_killed"].index(kind) if kind != "random" else rng.randrange(2)
        if choose is not None:
            target, kind_index = choose([target, kind_index])
        self.fault_rank = target
        self.fault_type = "rank_hung" if kind_index == 0 else "rank_killed"

    def _start_fault_thread(self) -> None:
        if self.fault_rank != self.rank or self.fault_type is None:
            return
        delay = max(0.0, float(self.cfg.simulated_fault_base_delay)) + random.random()
        self._fault_thread = threading.Thread(
            target=self._inject, args=(self.fault_type, delay), name="viaduct-ft-fault", daemon=True
        )
        self._fault_thread.start()

    def _inject(self, kind: Literal["rank_hung", "rank_killed"], delay: float) -> None:
        time.sleep(delay)
        _write_fd(2, f"[viaduct ft] rank {self.rank}: simulated fault {kind} now (at {time.time():.3f})\n")
        if kind == "rank_killed":
            os.kill(os.getpid(), signal.SIGKILL)
        self._hang_requested.set()


def _simulated_hang() -> None:
    """The main thread stops here for good: what a deadlocked rank looks like (ft.simulate_fault)."""
    while True:
        time.sleep(3600)


def _describe(timeouts: dict[Section, float]) -> str:
    return ", ".join(f"{name} {timeouts[name]:g} s" for name in SECTIONS)


def rank_from_env() -> int:
    """This process's rank before the process group exists (torchrun's RANK; 0 without it)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0
