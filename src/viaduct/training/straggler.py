"""Straggler detection: which ranks run their training steps slower than the others, or than before.

Each rank times the compute of its own steps (the forward-step calls of each training step, with CUDA
events on a GPU and `time.perf_counter` on a CPU; see `_StepTimer` for why not the whole step) and
keeps the times to itself. At each report, the ranks exchange a few numbers (their median and
best step time of the window, the window's wall time and, from rank 0, a pending on/off request) in
one `all_gather` over the host (gloo) group; there is no collective in between. Every rank computes
the same scores from the same gathered numbers, so every rank reaches the same decision (stop or go
on) without a further message.

- *relative* score of a rank: the fastest rank's median step time / this rank's (1.0 for the fastest);
- *individual* score of a rank: its own best median step time of earlier windows / this window's
  (1.0 while it is as fast as it ever was).

`straggler` (Megatron Core's detector) reports every `logger.log_interval` steps and can be switched
on and off at run time through a small HTTP endpoint on rank 0 (`straggler_ctrlr_port`);
`nvrx_straggler` reports every `report_time_interval` seconds, flags the ranks below its thresholds
and can stop the run (`stop_if_detected`).
"""

from __future__ import annotations

import functools
import http.server
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from viaduct.config import ConfigError, Problem
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.forward_contract import ForwardStepFunc, LossFunc

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import ConfigContainer

log = logging.getLogger("viaduct.straggler")

Toggle = Literal["enable", "disable"]
_TOGGLE_CODES: dict[Toggle | None, float] = {None: 0.0, "enable": 1.0, "disable": 2.0}
_TOGGLES_BY_CODE: dict[int, Toggle | None] = {0: None, 1: "enable", 2: "disable"}
# One row per rank in the gathered tensor: [toggle request (rank 0's counts), steps timed, median step
# time (s), wall time since the last report (s), wall time since the last exchange (s)].


@dataclass(frozen=True)
class RankScore:
    """One rank's numbers in a report."""

    rank: int
    median_step_s: float
    """Median step time of the window, in seconds."""
    steps: int
    """Steps timed in the window."""
    relative: float | None
    """Fastest rank's median / this rank's (None when not computed)."""
    individual: float | None
    """This rank's best earlier median / this window's (None when not computed)."""


@dataclass
class StragglerReport:
    """What one report found; every rank computes the same one."""

    step: int
    """Iteration at which the report was made."""
    scores: list[RankScore]
    """One entry per rank that timed at least one step in the window, in rank order."""
    stragglers: dict[int, list[str]] = field(default_factory=dict)
    """Rank -> why it counts as a straggler ("relative score 0.31 < 0.7")."""


def score_ranks(
    medians: Sequence[float | None],
    counts: Sequence[int],
    best_before: Sequence[float | None],
    *,
    relative: bool,
    individual: bool,
) -> list[RankScore]:
    """The scores of each rank that has a median (ranks without one timed no step in the window).

    `best_before[r]` is rank r's best (smallest) median of earlier windows, or None on its first.
    """
    present = [m for m in medians if m is not None]
    fastest = min(present) if present else 0.0
    scores = []
    for rank, (median, count) in enumerate(zip(medians, counts)):
        if median is None:
            continue
        rel = ind = None
        if relative:
            rel = fastest / median if median > 0 else 1.0
        if individual:
            best = best_before[rank]
            ind = 1.0 if best is None or median <= 0 else min(1.0, best / median)
        scores.append(RankScore(rank, median, count, rel, ind))
    return scores


class _StepTimer:
    """This rank's step times: the summed duration of the step's forward-step calls (fetching the
    batch and running the model forward), as Megatron Core's detector times them.

    Not the whole step: under data parallelism a fast rank waits for the slow one in the gradient
    all-reduce, so whole steps take equally long everywhere and hide the straggler. On a GPU the
    calls are timed with CUDA events, read back once the device is past them (the host never waits
    inside a report window); on a CPU with the wall clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.times: list[float] = []
        self.active = False
        """True between the start and the end of a timed training step."""
        self._steps: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = []  # steps still on the device
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._call_start: torch.cuda.Event | float | None = None
        self._sum = 0.0
        self._calls = 0

    def begin_step(self) -> None:
        self.active = True
        self._pairs, self._sum, self._calls = [], 0.0, 0

    def start(self) -> None:
        if not self.active:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._call_start = event
        else:
            self._call_start = time.perf_counter()

    def stop(self) -> None:
        started, self._call_start = self._call_start, None
        if not self.active or started is None:
            return
        self._calls += 1
        if isinstance(started, float):
            self._sum += time.perf_counter() - started
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((started, end))

    def end_step(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.cuda and self._pairs:
            self._steps.append(self._pairs)
            self._resolve(wait=False)
        elif self._calls:
            self.times.append(self._sum)

    def _resolve(self, *, wait: bool) -> None:
        # Completed steps become numbers as soon as the device is past them, so the list stays short.
        while self._steps:
            pairs = self._steps[0]
            if not wait and not pairs[-1][1].query():
                break
            pairs[-1][1].synchronize()
            self.times.append(sum(start.elapsed_time(end) for start, end in pairs) / 1000.0)
            self._steps.pop(0)

    def window(self) -> list[float]:
        """The times of the window so far (waiting for the device's last ones)."""
        self._resolve(wait=True)
        return list(self.times)

    def discard(self) -> None:
        self.times.clear()
        self._steps.clear()


class ControlServer:
    """A tiny HTTP endpoint on 127.0.0.1 that only records "enable" / "disable" requests.

    `GET` or `POST` of `/enable` or `/disable` asks for the change (it takes effect on every rank at
    the next report); `GET /` or `/status` answers whether detection is on. Nothing in a request
    is read beyond its path, and nothing else is accepted.
    """

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self._pending: Toggle | None = None
        self.enabled = False
        """What the detector last applied (shown by /status)."""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 5.0  # a client that connects and sends nothing does not hold a thread for long

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                if path in ("/enable", "/disable"):
                    toggle: Toggle = "enable" if path == "/enable" else "disable"
                    server.request(toggle)
                    self._send(200, f"straggler detection will be {toggle}d at the next report\n")
                elif path in ("/", "/status"):
                    self._send(200, f"straggler detection is {'on' if server.enabled else 'off'}\n")
                else:
                    self._send(404, "unknown request: use /enable, /disable or /status\n")

            def _send(self, code: int, text: str) -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                log.debug("straggler control: " + format, *args)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="straggler-control", daemon=True
        )
        self._thread.start()

    def request(self, toggle: Toggle) -> None:
        with self._lock:
            self._pending = toggle

    def take(self) -> Toggle | None:
        """The last request since the previous call (None: none)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class StragglerDetection(Callback):
    """One detector, run as a built-in callback (`on_train_step_start` / `on_train_step_end`)."""

    def __init__(
        self,
        *,
        name: str,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        host_device: torch.device | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        enabled: bool = True,
        relative: bool = True,
        individual: bool = False,
        relative_threshold: float | None = None,
        individual_threshold: float | None = None,
        num_to_print: int = 1,
        profiling_interval: int = 1,
        stop_if_detected: bool = False,
        logger_name: str | None = None,
        enable_logging: bool = True,
        control: ControlServer | None = None,
    ) -> None:
        if (every_steps is None) == (every_seconds is None):
            raise ValueError("StragglerDetection needs exactly one of every_steps and every_seconds")
        self.name = name
        self.rank, self.world_size, self.group = rank, world_size, group
        self.host_device = host_device or torch.device("cpu")
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.enabled = enabled
        self.relative, self.individual = relative, individual
        self.relative_threshold, self.individual_threshold = relative_threshold, individual_threshold
        self.num_to_print = num_to_print
        self.profiling_interval = profiling_interval
        self.stop_if_detected = stop_if_detected
        self.logger_name = logger_name
        self.enable_logging = enable_logging
        self.control = control
        if control is not None:
            control.enabled = enabled
        self.timer = _StepTimer(device)
        self.reports: list[StragglerReport] = []
        """Every report made, oldest first (the same on every rank)."""
        self.stop_reason: str | None = None
        """Set on every rank at once when a straggler stops the run (stop_if_detected)."""
        self._best: list[float | None] = [None] * world_size
        self._next_check: int | None = None  # every_seconds: the step of the next exchange
        self._window_start = time.monotonic()  # wall clock of the last report
        self._check_start = self._window_start  # and of the last exchange
        self._steps_since_check = 0

    # ------------------------------------------------------------------------------------ hooks

    def on_train_step_start(self, ctx: CallbackContext) -> None:
        step = ctx.state.train_state.step + 1
        if self.enabled and step % self.profiling_interval == 0:
            self.timer.begin_step()

    def on_train_step_end(self, ctx: CallbackContext) -> None:
        self.timer.end_step()
        self._steps_since_check += 1
        step = ctx.state.train_state.step
        if self._due(step):
            self.exchange(step)

    # ----------------------------------------------------------------------------------- report

    def _due(self, step: int) -> bool:
        if self.every_steps is not None:
            return step % self.every_steps == 0
        if self._next_check is None:  # the first step: measure how long steps take
            return True
        return step >= self._next_check

    def exchange(self, step: int) -> StragglerReport | None:
        """Gather every rank's numbers (one all_gather), apply a pending on/off request, report.

        Every rank must call it at the same step; returns the report made, if any.
        """
        times = self.timer.window()
        toggle = self.control.take() if self.control is not None and self.rank == 0 else None
        now = time.monotonic()
        mine = [
            _TOGGLE_CODES[toggle],
            float(len(times)),
            statistics.median(times) if times else 0.0,
            now - self._window_start,
            now - self._check_start,
        ]
        rows = self._gather(mine)
        # All decisions below use the gathered numbers only, so every rank takes the same ones.
        report_due = True
        if self.every_seconds is not None:
            # The slowest rank's clock decides; the next exchange is planned from the slowest rank's
            # wall time per step, so it lands at about the interval without asking in between. The
            # report is made at the step boundary nearest to the end of the interval.
            elapsed = max(r[3] for r in rows)
            per_step = max(max(r[4] for r in rows) / max(1, self._steps_since_check), 1e-6)
            report_due = elapsed + per_step / 2 >= self.every_seconds
            remaining = self.every_seconds - (0.0 if report_due else elapsed)
            self._next_check = step + max(1, math.ceil(remaining / per_step))
        self._check_start, self._steps_since_check = now, 0

        was_enabled = self.enabled
        request = _TOGGLES_BY_CODE.get(int(rows[0][0]))
        if request is not None:
            self.enabled = request == "enable"
            if self.control is not None:
                self.control.enabled = self.enabled
            if self.rank == 0 and self.enabled != was_enabled:
                self._logger().info(
                    "%s: detection %s at iteration %d (control request)",
                    self.name,
                    "enabled" if self.enabled else "disabled",
                    step,
                )
        if not report_due:
            return None
        self._window_start = now
        self.timer.discard()  # the next report scores the steps after this one
        if not (was_enabled and self.enabled):
            return None
        medians = [r[2] if r[1] > 0 else None for r in rows]
        counts = [int(r[1]) for r in rows]
        if all(m is None for m in medians):
            return None
        scores = score_ranks(medians, counts, self._best, relative=self.relative, individual=self.individual)
        for s in scores:
            best = self._best[s.rank]
            self._best[s.rank] = s.median_step_s if best is None else min(best, s.median_step_s)
        report = StragglerReport(step, scores, self._stragglers(scores))
        self.reports.append(report)
        if self.rank == 0 and self.enable_logging:
            self._log(report)
        if report.stragglers and self.stop_if_detected:
            self.stop_reason = f"straggler detected ({_describe(report.stragglers)})"
        return report

    def _gather(self, mine: list[float]) -> list[list[float]]:
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [mine]
        local = torch.tensor(mine, dtype=torch.float64, device=self.host_device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.group)
        return [t.cpu().tolist() for t in out]

    def _stragglers(self, scores: list[RankScore]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for s in scores:
            why = []
            if s.relative is not None and self.relative_threshold is not None:
                if s.relative < self.relative_threshold:
                    why.append(f"relative score {s.relative:.2f} < {self.relative_threshold:g}")
            if s.individual is not None and self.individual_threshold is not None:
                if s.individual < self.individual_threshold:
                    why.append(f"individual score {s.individual:.2f} < {self.individual_threshold:g}")
            if why:
                found[s.rank] = why
        return found

    def _logger(self) -> logging.Logger:
        # The configured logger when something would print its records; viaduct's console otherwise,
        # so a report never disappears into a logger nobody listens to.
        if self.logger_name is not None:
            named = logging.getLogger(self.logger_name)
            if named.hasHandlers():
                return named
        return log

    def _log(self, report: StragglerReport) -> None:
        out = self._logger()
        n = self.num_to_print
        if n > 0:
            for kind in ("relative", "individual"):
                ranked = [s for s in report.scores if getattr(s, kind) is not None]
                if not ranked:
                    continue
                ranked.sort(key=lambda s: (-getattr(s, kind), s.rank))
                out.info(
                    "%s report at iteration %d, %s scores: best %s; worst %s",
                    self.name,
                    report.step,
                    kind,
                    _list(ranked[:n], kind),
                    _list(list(reversed(ranked))[:n], kind),
                )
        if report.stragglers:
            out.warning(
                "%s: stragglers at iteration %d: %s", self.name, report.step, _describe(report.stragglers)
            )


def time_forward_step(
    forward_step: ForwardStepFunc, detectors: Sequence[StragglerDetection]
) -> ForwardStepFunc:
    """`forward_step`, timed by each detector during training steps (evaluation calls are not timed)."""
    if not detectors:
        return forward_step

    @functools.wraps(forward_step)
    def timed(data_iterator: Iterator[Any], model: torch.nn.Module) -> tuple[Any, LossFunc]:
        for d in detectors:
            d.timer.start()
        try:
            return forward_step(data_iterator, model)
        finally:
            for d in detectors:
                d.timer.stop()

    return timed


def _list(scores: list[RankScore], kind: str) -> str:
    return ", ".join(
        f"rank {s.rank} {getattr(s, kind):.2f} ({s.median_step_s * 1000:.1f} ms/step)" for s in scores
    )


def _describe(stragglers: dict[int, list[str]]) -> str:
    return "; ".join(f"rank {rank}: {', '.join(why)}" for rank, why in sorted(stragglers.items()))


def build_straggler_detection(
    cfg: ConfigContainer, ctx: DistributedContext, resources: list[Callable[[], object]]
) -> list[StragglerDetection]:
    """The detectors the config turns on (none by default: then nothing is timed or exchanged).

    Adds what must be closed at the end (the control endpoint) to `resources`.
    """
    detectors: list[StragglerDetection] = []
    detector = functools.partial(
        StragglerDetection,
        device=ctx.device,
        rank=ctx.rank,
        world_size=ctx.world_size if ctx.distributed else 1,
        group=ctx.host_group,
        host_device=ctx.host_device,
    )
    legacy = cfg.straggler
    if legacy is not None and legacy.log_straggler:
        control = _start_control(legacy.straggler_ctrlr_port, ctx)
        if control is not None:
            resources.append(control.close)
        detectors.append(
            detector(
                name="straggler",
                every_steps=cfg.logger.log_interval,
                enabled=legacy.enable_straggler_on_startup and not legacy.disable_straggler_on_startup,
                relative=True,
                individual=True,
                num_to_print=legacy.straggler_minmax_count,
                control=control,
            )
        )
    nvrx = cfg.nvrx_straggler
    if nvrx is not None and nvrx.enabled:
        detectors.append(
            detector(
                name="nvrx_straggler",
                every_seconds=nvrx.report_time_interval,
                relative=nvrx.calc_relative_gpu_perf,
                individual=nvrx.calc_individual_gpu_perf,
                relative_threshold=nvrx.gpu_relative_perf_threshold,
                individual_threshold=nvrx.gpu_individual_perf_threshold,
                num_to_print=nvrx.num_gpu_perf_scores_to_print,
                profiling_interval=nvrx.profiling_interval,
                stop_if_detected=nvrx.stop_if_detected,
                logger_name=nvrx.logger_name,
                enable_logging=nvrx.enable_logging,
            )
        )
    return detectors


def _start_control(port: int, ctx: DistributedContext) -> ControlServer | None:
    """Rank 0's control endpoint; every rank learns whether it started (one collective at setup), so
    a taken port stops all ranks with the same error instead of leaving the others waiting."""
    server: ControlServer | None = None
    error = ""
    if ctx.rank == 0:
        try:
            server = ControlServer(port)
        except OSError as e:
            error = e.strerror or str(e)
    failed = torch.tensor([0.0 if not error else 1.0], device=ctx.host_device)
    if ctx.distributed:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=ctx.host_group)
    if failed.item():
        raise ConfigError(
            Problem(
                "straggler.straggler_ctrlr_port",
                f"rank 0 cannot listen on 127.0.0.1:{port}" + (f" ({error})" if error else ""),
                port,
                fix="set straggler.straggler_ctrlr_port to a free port (another job may use this one)",
            )
        )
    return server
