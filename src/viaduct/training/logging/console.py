"""What the training loop prints: the Megatron-style iteration line, the validation box, timers.

Everything goes through the Python logger "viaduct" (so `logger.logging_level` and
`logger.modules_to_filter` apply to it). `install_console_handler()` gives that logger one handler
that writes to the *current* `sys.stdout` (looked up at each record, so redirections and pytest's
capsys see it) and, while a progress bar is shown, through `tqdm.write` so lines do not tear the
bar. Records still propagate to the root logger, so an application's own handlers (files, pytest's
caplog) receive them too; when the root logger already prints to the console, ours stays silent
rather than print each line twice.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import IO, Any

CONSOLE_LOGGER = "viaduct"

_active_bar: ProgressDisplay | None = None


def _root_prints_to_console() -> bool:
    streams = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    return any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in streams
        for h in logging.getLogger().handlers
    )


class ConsoleHandler(logging.Handler):
    """Writes viaduct's records to stdout, or through the active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if _root_prints_to_console():
                return  # the record propagates to a root handler that prints it already
            message = self.format(record)
            bar = _active_bar
            if bar is not None:
                bar.write(message)
            else:
                stream = sys.stdout
                stream.write(message + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """The message alone for INFO and below (training lines carry their own timestamp)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {record.name}: {message}"
        return message


def install_console_handler() -> ConsoleHandler:
    """Give the "viaduct" logger its console handler (once) and level INFO if it has none."""
    logger = logging.getLogger(CONSOLE_LOGGER)
    for handler in logger.handlers:
        if isinstance(handler, ConsoleHandler):
            return handler
    handler = ConsoleHandler()
    handler.setFormatter(_ConsoleFormatter())
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        # Without a level the logger inherits the root's WARNING and the training lines vanish.
        logger.setLevel(logging.INFO)
    return handler


class ProgressDisplay:
    """A tqdm bar over the training iterations, with an ETA; console lines print above it."""

    def __init__(self, total: int, initial: int = 0, *, file: IO[str] | None = None) -> None:
        from tqdm.auto import tqdm

        self._bar: Any = tqdm(
            total=total,
            initial=initial,
            desc="training",
            unit="it",
            file=file if file is not None else sys.stdout,
            dynamic_ncols=True,
            leave=True,
        )
        self._file = self._bar.fp
        global _active_bar
        _active_bar = self

    @property
    def n(self) -> int:
        """The iteration the bar shows."""
        return int(self._bar.n)

    def update_to(self, step: int) -> None:
        """Move the bar to `step` (cheap: tqdm redraws at most every few tenths of a second)."""
        delta = step - self._bar.n
        if delta > 0:
            self._bar.update(delta)

    def write(self, message: str) -> None:
        """Print a line above the bar."""
        self._bar.write(message, file=self._file)

    def close(self) -> None:
        global _active_bar
        if _active_bar is self:
            _active_bar = None
        self._bar.close()


def format_timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")


def format_train_line(
    *,
    step: int,
    train_iters: int,
    consumed_samples: int,
    ms_per_iteration: float,
    learning_rate: float,
    global_batch_size: int,
    losses: Mapping[str, float],
    skipped: int,
    nan: int,
    throughput: Mapping[str, float] | None = None,
    decoupled_learning_rate: float | None = None,
    loss_scale: float | None = None,
    grad_norm: float | None = None,
    num_zeros: float | None = None,
    params_norm: float | None = None,
    now: datetime | None = None,
) -> str:
    """The Megatron iteration line, fields in Megatron's order and number formats.

    `throughput` holds "tflops" (TFLOP/s per GPU), "tokens" (tokens/s per GPU) and optionally
    "mfu" (percent of the device's peak).
    """
    s = f" [{format_timestamp(now)}]"
    s += f" iteration {step:8d}/{train_iters:8d} |"
    s += f" consumed samples: {consumed_samples:12d} |"
    s += f" elapsed time per iteration (ms): {ms_per_iteration:.1f} |"
    if throughput is not None:
        s += f" throughput per GPU (TFLOP/s/GPU): {throughput['tflops']:.1f} |"
        s += f" tokens per second per GPU: {throughput['tokens']:.1f} |"
        if "mfu" in throughput:
            s += f" MFU: {throughput['mfu']:.1f}% |"
    s += f" learning rate: {learning_rate:.6E} |"
    if decoupled_learning_rate is not None:
        s += f" decoupled learning rate: {decoupled_learning_rate:.6E} |"
    s += f" global batch size: {global_batch_size:5d} |"
    for key, value in losses.items():
        s += f" {key}: {value:.6E} |"
    if loss_scale is not None:
        s += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        s += f" grad norm: {grad_norm:.3f} |"
    if num_zeros is not None:
        s += f" num zeros: {num_zeros:.1f} |"
    if params_norm is not None:
        s += f" params norm: {params_norm:.3f} |"
    s += f" number of skipped iterations: {skipped:3d} |"
    s += f" number of nan iterations: {nan:3d} |"
    return s


def format_timers(timers: Mapping[str, tuple[float, float]], option: str) -> str | None:
    """Megatron's timer block: seconds per iteration in, milliseconds out; None when empty."""
    if not timers:
        return None
    if option == "max":
        lines = ["max time across ranks (ms):"]
        lines += [f"    {(name + ' ').ljust(48, '.')}: {hi * 1000.0:.2f}" for name, (_, hi) in timers.items()]
    else:
        lines = ["(min, max) time across ranks (ms):"]
        lines += [
            f"    {(name + ' ').ljust(48, '.')}: ({lo * 1000.0:.2f}, {hi * 1000.0:.2f})"
            for name, (lo, hi) in timers.items()
        ]
    return "\n".join(lines)


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(20) as Megatron does so a diverged run prints a number; NaN stays NaN.

    `min(20.0, nan)` is 20.0 (every comparison with NaN is false), so without the check a NaN loss
    would print the finite exp(20) and hide that the evaluation broke.
    """
    if math.isnan(loss):
        return math.nan
    return math.exp(min(20.0, loss))


def format_evaluation_box(step: int, losses: Mapping[str, float], split: str) -> list[str]:
    """The dashed box printed after an evaluation: three lines (rule, values, rule)."""
    text = f" validation loss at iteration {step} on {split} set | "
    for key, value in losses.items():
        text += f"{key} value: {value:.6E} | {key} PPL: {perplexity(value):.6E} | "
    rule = "-" * (len(text) + 1)
    return [rule, text, rule]
