"""Result validation by re-running iterations (Megatron's rerun state machine, in plain PyTorch).

Each micro-batch's local loss (before any data-parallel reduction) is checked after the step's
forward/backward and before the optimizer step: NaN / Inf (fatal, `check_for_nan_in_loss`) and a
spike over `spiky_loss_factor` × the largest of the last 100 local losses (non-fatal,
`check_for_spiky_loss`).

`rerun_mode="validate_results"`: when any rank rejects a result, every rank re-runs the iteration in
place: the same micro-batches (recorded while the step drew them), the same RNG states (captured at
the start of the step), the same weights (the optimizer has not stepped; gradients are zeroed). A
replay that differs from the rejected result is a transient fault: logged, and training goes on with
the replay. An identical replay of a fatal check saves a checkpoint and exits with code 16 so the job
resumes on other hardware; that resumed run re-runs the iteration once more: a different result is a
persistent fault of the previous machine (training goes on), the same result is correct (a real
data or model problem) and a fatal check stops the job with exit code 17. What the resumed run needs
(the iteration and each rank's rejected value) travels in the checkpoint's ``common.pt`` as a JSON
string. Ranks never diverge: whether any rank rejected a result travels in the all-reduce of the
step's metrics that every step makes anyway (no collective of its own), a replay's outcomes are
reduced with MAX over all ranks, and every rank acts on the reduced verdict.

`rerun_mode="report_determinism_stats"`: every iteration runs twice; the absolute differences of
the two runs' local losses are accumulated on the device and reported every log interval.

Events are appended, one JSON object a line, to the validation log (`validation_log_path`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer
    from viaduct.training.config.resilience import RerunStateMachineConfig
    from viaduct.training.train_step import MetricAccumulator

log = logging.getLogger("viaduct")

EXIT_CODE_RESUME_TO_DISAMBIGUATE = 16
"""Rerun requested: resume on another GPU to tell a persistent fault from a correct result."""
EXIT_CODE_FAILED_ON_RESULT_VALIDATION = 17
"""The rejected result was reproduced on other hardware: it is correct and the check is fatal."""

VALIDATION_LOG_NAME = "rerun_validation.jsonl"
CHECKPOINT_KEY = "rerun_state_machine"
"""Key of the machine's JSON record in a checkpoint's common.pt."""

_SPIKE_WINDOW = 100
_CHECK_NAN, _CHECK_SPIKE = 1, 2
_INJECT_CODES = {"correct_result": 1, "transient_error": 2, "persistent_error": 3}
_INJECT_NAMES = {v: k for k, v in _INJECT_CODES.items()}
# Outcomes of one replay on one rank, reduced with MAX over the ranks.
_NONE, _TRANSIENT, _SAME_NONFATAL, _SAME_FATAL = 0, 1, 2, 3


class Restorable(Protocol):
    def restore(self) -> None: ...


class RerunExit(Exception):
    """Raised out of the step (before the optimizer step) when the job must stop with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def validation_log_path(cfg: ConfigContainer) -> Path | None:
    """<checkpoint.save>/rerun_validation.jsonl; without a save directory, next to the TensorBoard
    directory; None when the run writes neither (events then go to the Python log only)."""
    if cfg.checkpoint.save:
        return Path(cfg.checkpoint.save).expanduser() / VALIDATION_LOG_NAME
    if cfg.logger.tensorboard_dir:
        return Path(cfg.logger.tensorboard_dir).expanduser().absolute().parent / VALIDATION_LOG_NAME
    return None


class _Recording:
    """The step's data iterator, keeping every micro-batch it hands out so the step can be replayed."""

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        self.batches: list[Any] = []

    def __iter__(self) -> _Recording:
        return self

    def __next__(self) -> Any:
        item = next(self.source)
        self.batches.append(item)
        return item


@dataclass
class _Rejection:
    microbatch: int
    value: float
    check: int
    injected: int = 0

    @property
    def fatal(self) -> bool:
        return self.check == _CHECK_NAN


def _same(a: float, b: float) -> bool:
    """Bitwise-equal results (every NaN counts as the same result)."""
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def _host_values(local: list[torch.Tensor]) -> list[float]:
    """The step's local losses on the host, in one copy (the one sync the checks need)."""
    return torch.stack([v.detach().float().view(()) for v in local]).cpu().tolist() if local else []


def _json_number(value: float) -> float | str:
    """JSON has no NaN or infinity: those become "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else repr(value)


RunOnce = Callable[[Iterator[Any]], "tuple[MetricAccumulator, list[torch.Tensor]]"]
"""One forward/backward of the step over the given iterator: (its metrics, not reduced yet; local
losses)."""


class RerunStateMachine:
    """Validates each step's local losses and re-runs iterations as `rerun_mode` says."""

    def __init__(
        self,
        cfg: RerunStateMachineConfig,
        *,
        capture_rng: Callable[[], Restorable],
        rank: int = 0,
        group: dist.ProcessGroup | None = None,
        distributed: bool = False,
        host_device: torch.device | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.mode = cfg.rerun_mode
        self.capture_rng = capture_rng
        self.rank = rank
        self.group = group
        self.distributed = distributed
        self.host_device = host_device or torch.device("cpu")
        """Where the tensors of `group`'s collectives live (CPU for a gloo group)."""
        self.log_path = log_path
        self.validations = 0
        """NaN-check validations of first runs so far (error injection counts them)."""
        self.recent: list[float] = []
        self.resumed: dict[int, _Rejection] = {}
        """This rank's rejection at `resumed_iteration`, saved by the run that exited with code 16."""
        self.resumed_iteration: int | None = None
        self.pending: dict[str, Any] | None = None
        """The record the next checkpoint carries (set just before the code-16 save)."""
        # report_determinism_stats: device accumulators, read at each log interval.
        self._diff_max: torch.Tensor | None = None
        self._diff_sum: torch.Tensor | None = None
        self._diff_count = 0
        self._unequal: torch.Tensor | None = None
        self._iterations = 0

    @property
    def active(self) -> bool:
        return self.mode != "disabled"

    # ---------------------------------------------------------------------------------- one step

    def run_step(
        self, step: int, data_iterator: Iterator[Any], run_once: RunOnce, zero_grad: Callable[[], None]
    ) -> dict[str, torch.Tensor]:
        """Run the step's forward/backward as the mode says; returns the reduced metrics to keep.

        Raises `RerunExit` when the job must stop (the optimizer has not stepped then)."""
        rng = self.capture_rng()
        recording = _Recording(data_iterator)
        metrics, local = run_once(recording)
        if self.mode == "report_determinism_stats":
            return self._second_run(rng, recording, local, run_once, zero_grad)
        values = _host_values(local)
        if self.resumed_iteration == step:
            self._check_resumed(step, values)
        rejection = self._validate(step, values, first_run=self.resumed_iteration != step)
        if self.resumed_iteration == step:
            self.resumed_iteration, self.resumed = None, {}
        # Whether any rank rejected rides along with the metrics' all-reduce (summed over the ranks).
        device = local[0].device if local else self.host_device
        flag = torch.tensor([1.0 if rejection is not None else 0.0], device=device)
        losses, rejected = metrics.reduce_with_flags(flag)
        if rejected is None or float(rejected[0].item()) == 0.0:
            return losses
        # Some rank rejected a result: every rank replays the iteration in place.
        zero_grad()
        rng.restore()
        metrics, local = run_once(iter(list(recording.batches)))
        losses = metrics.reduce()
        replayed = _host_values(local)
        outcome = _NONE
        if rejection is not None:
            value = replayed[rejection.microbatch]
            if rejection.injected == _INJECT_CODES["persistent_error"] or (
                rejection.injected == _INJECT_CODES["correct_result"]
            ):
                value = float("nan")  # the fault (or the correct result) shows again on this machine
            if not _same(value, rejection.value):
                outcome = _TRANSIENT
                self._event(step, "transient_fault", rejection, replay=value)
                log.warning(
                    "iteration %d: transient fault: the rejected loss %s of micro-batch %d came out as %s "
                    "when re-run; training continues with the re-run's result",
                    step,
                    rejection.value,
                    rejection.microbatch,
                    value,
                )
            elif rejection.fatal:
                outcome = _SAME_FATAL
                self._event(step, "reproduced_in_place", rejection, replay=value)
            else:
                outcome = _SAME_NONFATAL
                self._event(step, "spiky_loss_reproduced", rejection, replay=value)
                log.warning(
                    "iteration %d: the spiky loss %s of micro-batch %d is reproduced when re-run; "
                    "training continues",
                    step,
                    rejection.value,
                    rejection.microbatch,
                )
        outcome = self._reduce_max(outcome)
        if outcome == _SAME_FATAL:
            rng.restore()  # the checkpoint's RNG state is the step's start
            self.pending = self._record(step, rejection)
            raise RerunExit(
                EXIT_CODE_RESUME_TO_DISAMBIGUATE,
                f"rerun requested at iteration {step}: a rejected result was reproduced on this machine; "
                f"resume on another GPU to disambiguate (exit code {EXIT_CODE_RESUME_TO_DISAMBIGUATE})",
            )
        return losses

    def _validate(self, step: int, values: list[float], *, first_run: bool) -> _Rejection | None:
        cfg = self.cfg
        rejection: _Rejection | None = None
        for i, value in enumerate(values):
            if cfg.check_for_nan_in_loss:
                injected = 0
                if first_run and self.mode == "validate_results" and cfg.error_injection_rate > 0:
                    self.validations += 1
                    if self.validations % cfg.error_injection_rate == 0:
                        injected = _INJECT_CODES[cfg.error_injection_type]
                        value = float("nan")
                if not math.isfinite(value) and rejection is None:
                    rejection = _Rejection(i, value, _CHECK_NAN, injected)
                    self._event(step, "rejected", rejection)
            if cfg.check_for_spiky_loss and rejection is None and self.recent:
                if value > cfg.spiky_loss_factor * max(self.recent):
                    rejection = _Rejection(i, value, _CHECK_SPIKE)
                    self._event(step, "rejected", rejection, window_max=max(self.recent))
            if math.isfinite(value):
                self.recent.append(value)
                del self.recent[:-_SPIKE_WINDOW]
        return rejection

    def _check_resumed(self, step: int, values: list[float]) -> None:
        """The iteration re-run after the code-16 restart: tell a persistent fault from a correct result."""
        outcome = _NONE
        mine = self.resumed.get(self.rank)
        if mine is not None:
            value = values[mine.microbatch] if mine.microbatch < len(values) else float("nan")
            if mine.injected == _INJECT_CODES["correct_result"]:
                value = float("nan")  # an injected correct result is the same on every machine
            if _same(value, mine.value):
                outcome = _SAME_FATAL if mine.fatal else _SAME_NONFATAL
                self._event(step, "result_reproduced_after_restart", mine, replay=value)
            else:
                outcome = _TRANSIENT
                self._event(step, "persistent_fault", mine, replay=value)
                log.warning(
                    "iteration %d: persistent fault on the previous machine: its rejected loss %s came out "
                    "as %s after the restart; training continues",
                    step,
                    mine.value,
                    value,
                )
        if self._reduce_max(outcome) == _SAME_FATAL:
            raise RerunExit(
                EXIT_CODE_FAILED_ON_RESULT_VALIDATION,
                f"the rejected result of iteration {step} is reproduced after the restart: it is correct "
                "(a data or model problem, not a hardware fault) and the check is fatal; stopping "
                f"(exit code {EXIT_CODE_FAILED_ON_RESULT_VALIDATION}). Lower optimizer.lr, raise "
                "optimizer.clip_grad or check the data",
            )

    def _second_run(
        self,
        rng: Restorable,
        recording: _Recording,
        local: list[torch.Tensor],
        run_once: RunOnce,
        zero_grad: Callable[[], None],
    ) -> dict[str, torch.Tensor]:
        """Run the step again from its start; training continues with the second run."""
        zero_grad()
        rng.restore()
        metrics, again = run_once(iter(list(recording.batches)))
        losses = metrics.reduce()
        if local:
            first = torch.stack([v.detach().float().view(()) for v in local])
            second = torch.stack([v.detach().float().view(()) for v in again])
            diff = (first - second).abs()
            unequal = (first.view(torch.int32) != second.view(torch.int32)).any().float()
            self._diff_max = (
                diff.max() if self._diff_max is None else torch.maximum(self._diff_max, diff.max())
            )
            self._diff_sum = diff.sum() if self._diff_sum is None else self._diff_sum + diff.sum()
            self._unequal = unequal if self._unequal is None else self._unequal + unequal
            self._diff_count += diff.numel()
        self._iterations += 1
        return losses

    def determinism_report(self) -> str | None:
        """The interval's variability line (report_determinism_stats), then reset; None otherwise."""
        if self.mode != "report_determinism_stats" or self._iterations == 0:
            return None
        if self._diff_max is None or self._diff_sum is None or self._unequal is None:
            host = [0.0, 0.0, 0.0]
        else:
            host = torch.stack([self._diff_max, self._diff_sum, self._unequal]).cpu().tolist()
        mean = host[1] / max(self._diff_count, 1)
        line = (
            f"determinism over {self._iterations} iterations (each run twice): loss max abs diff "
            f"{host[0]:.3e}, mean abs diff {mean:.3e}, {int(host[2])} iterations not bitwise equal"
        )
        self._event(
            None,
            "determinism_stats",
            None,
            iterations=self._iterations,
            max_abs_diff=host[0],
            mean_abs_diff=mean,
            unequal_iterations=int(host[2]),
        )
        self._diff_max = self._diff_sum = self._unequal = None
        self._diff_count = self._iterations = 0
        return line

    # -------------------------------------------------------------------------- agreement, log

    def _reduce_max(self, value: int) -> int:
        if not self.distributed:
            return value
        flag = torch.tensor([float(value)], device=self.host_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def _event(self, step: int | None, event: str, rejection: _Rejection | None, **extra: Any) -> None:
        record: dict[str, Any] = {"time": round(time.time(), 3), "rank": self.rank, "event": event}
        if step is not None:
            record["iteration"] = step
        if rejection is not None:
            record.update(
                check="nan_or_inf" if rejection.check == _CHECK_NAN else "spiky_loss",
                microbatch=rejection.microbatch,
                value=_json_number(rejection.value),
                fatal=rejection.fatal,
            )
            if rejection.injected:
                record["injected"] = _INJECT_NAMES[rejection.injected]
        record.update(
            {key: _json_number(val) if isinstance(val, float) else val for key, val in extra.items()}
        )
        if event != "determinism_stats":
            log.warning("result validation: %s", json.dumps(record, sort_keys=True))
        if self.log_path is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one line with O_APPEND: lines of several ranks never interleave.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------- checkpoint

    def _record(self, step: int, rejection: _Rejection | None) -> dict[str, Any]:
        """Every rank's rejection at `step`, gathered as numbers (no pickling), as a JSON-safe dict."""
        mine = [0.0, 0.0, 0.0, 0.0, 0.0]
        if rejection is not None:
            mine = [
                1.0,
                float(rejection.microbatch),
                rejection.value,
                float(rejection.check),
                float(rejection.injected),
            ]
        rows = [mine]
        if self.distributed:
            local = torch.tensor(mine, dtype=torch.float64, device=self.host_device)
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(gathered, local, group=self.group)
            rows = [g.tolist() for g in gathered]
        ranks = {
            str(r): {
                "microbatch": int(row[1]),
                "value": float(row[2]).hex(),
                "check": int(row[3]),
                "injected": int(row[4]),
            }
            for r, row in enumerate(rows)
            if row[0] > 0
        }
        return {"version": 1, "iteration": step, "validations": self.validations, "ranks": ranks}

    def checkpoint_state(self) -> str | None:
        """The JSON string a checkpoint keeps (None when nothing awaits a restart)."""
        return None if self.pending is None else json.dumps(self.pending, sort_keys=True)

    def load_checkpoint_state(self, text: object, source: str) -> None:
        """Restore what `checkpoint_state` saved; an unreadable record is reported and ignored."""
        if text is None:
            return
        try:
            if not isinstance(text, str) or len(text) >= 1_000_000:
                raise ValueError("not a record of a sensible size")
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            iteration = int(record["iteration"])
            validations = int(record.get("validations", 0))
            ranks = {
                int(r): _Rejection(
                    int(v["microbatch"]), float.fromhex(str(v["value"])), int(v["check"]), int(v["injected"])
                )
                for r, v in dict(record["ranks"]).items()
            }
            if any(r.check not in (_CHECK_NAN, _CHECK_SPIKE) or r.microbatch < 0 for r in ranks.values()):
                raise ValueError("unknown check")
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            log.warning("%s: its rerun_state_machine record is unreadable; ignored", source)
            return
        if self.mode != "validate_results":
            log.warning(
                "%s was saved to re-run iteration %d (rerun_state_machine), but rerun_mode is %r: "
                "the iteration runs as usual",
                source,
                iteration,
                self.mode,
            )
            return
        self.validations = validations
        self.resumed_iteration = iteration
        self.resumed = ranks
        log.info("resumed to re-run iteration %d and attribute its rejected result", iteration)
