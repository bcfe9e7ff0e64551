"""`TrainingLogger`: the training loop's one entry point for console lines and metrics.

The loop collects a `StepRecord` per optimizer step (values already on the host: it brings them
there once per `logger.log_interval`, so steps never wait on the device for logging) and calls
`log_train(records, timing)` on every rank. What each rank does:

- the last rank (it owns the loss on the last pipeline stage) prints the iteration line and the
  timers, and writes TensorBoard / W&B metrics;
- the first data-parallel rank of each model replica prints its memory line once, after the
  first logged interval (CUDA only);
- no rank needs a process group: nothing here is a collective.

Throughput (TFLOP/s per GPU, tokens/s per GPU and MFU when the device's peak is known) is on the
console line only with `logger.log_throughput`, as that field says: the recipes switch it on.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from viaduct.training.logging.console import (
    CONSOLE_LOGGER,
    ProgressDisplay,
    format_evaluation_box,
    format_timers,
    format_train_line,
    install_console_handler,
    perplexity,
)
from viaduct.training.logging.memory import (
    DEVICE_MEMORY_USED,
    format_memory_line,
    memory_report,
    theoretical_memory_line,
)
from viaduct.training.logging.metrics import MetricsWriter, ThroughputWindow, check_backends, runtime_metrics

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer


@dataclass
class StepRecord:
    """One optimizer step, values already on the host."""

    step: int
    """1-based iteration just finished."""
    consumed_samples: int
    learning_rate: float
    decoupled_learning_rate: float | None
    global_batch_size: int
    losses: dict[str, float]
    """E.g. {"lm loss": 2.31}; empty if the step was skipped."""
    grad_norm: float | None
    num_zeros: float | None
    params_norm: float | None
    loss_scale: float | None
    """None when there is no loss scaler."""
    skipped: bool
    """Update skipped (fp16 overflow, grad-norm threshold, iterations_to_skip)."""
    nan: bool
    """A loss was NaN or inf."""


@dataclass
class IntervalTiming:
    """Timing of the steps since the previous log_train call."""

    iterations: int
    """Steps since the previous log_train call (>= 1)."""
    elapsed_s: float
    """Wall-clock seconds of those steps."""
    tokens: int
    """Tokens trained in them, all ranks together."""
    flops: float
    """Analytic model FLOPs in them, all ranks together."""
    timers: dict[str, tuple[float, float]]
    """Timer name -> (min, max) seconds per iteration over ranks; {} at level 0."""


def _is_tty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # closed or detached stream
        return False


def _first_data_parallel_rank(cfg: ConfigContainer, rank: int, world_size: int) -> bool:
    """Whether `rank` is data-parallel rank 0 of its model replica.

    Ranks are laid out tensor-parallel fastest, then context-parallel, then data-parallel, then
    pipeline-parallel (Megatron's tp-cp-dp-pp order, also torchtitan's mesh order).
    """
    m = cfg.model
    inner = m.tensor_model_parallel_size * m.context_parallel_size
    dp = cfg.data_parallel_size or max(1, world_size // (inner * m.pipeline_model_parallel_size))
    return (rank // inner) % dp == 0


def _average_losses(records: list[StepRecord]) -> dict[str, float]:
    """Each loss key averaged over the records whose update was not skipped."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in records:
        if record.skipped:
            continue
        for key, value in record.losses.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


class TrainingLogger:
    """Console lines, progress bar and metrics of a training run (see module docstring)."""

    def __init__(
        self,
        cfg: ConfigContainer,
        *,
        rank: int,
        world_size: int,
        train_iters: int,
        peak_flops_per_device: float | None,
        device: torch.device,
        start_step: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        lc = cfg.logger
        check_backends(lc)  # on every rank, so all ranks stop together
        install_console_handler()
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.train_iters = train_iters
        self.peak_flops_per_device = peak_flops_per_device
        self.device = device
        self.start_step = start_step
        self.is_last_rank = rank == world_size - 1
        self._log = logging.getLogger(f"{CONSOLE_LOGGER}.training")
        self._metrics = MetricsWriter(cfg, enabled=self.is_last_rank)
        self._window = ThroughputWindow(lc.throughput_window_size)
        self._start = time.monotonic()
        self._reports_memory = _first_data_parallel_rank(cfg, rank, world_size)
        self._memory_reported = False
        self._closed = False
        self._bar: ProgressDisplay | None = None
        # tqdm is optional: without it (or without a terminal) there is simply no bar.
        if self.is_last_rank and _is_tty(sys.stdout) and importlib.util.find_spec("tqdm") is not None:
            self._bar = ProgressDisplay(train_iters, start_step)

    @property
    def metrics(self) -> MetricsWriter:
        """The TensorBoard / W&B writer (inactive on every rank but the last)."""
        return self._metrics

    # ------------------------------------------------------------------ training

    def log_train(self, records: list[StepRecord], timing: IntervalTiming) -> None:
        """Log the steps since the previous call; call on every rank at each logger.log_interval."""
        lc = self.cfg.logger
        if lc.skip_train_metrics_log or not records or self._closed:
            return
        if self.is_last_rank:
            per_step = timing.elapsed_s / max(1, timing.iterations)
            self._write_step_metrics(records, timing, per_step)
            self._write_interval_metrics(records[-1].step, timing, per_step)
            self._metrics.commit()
            self._log.info(self._train_line(records, timing, per_step))
            block = format_timers(timing.timers, lc.timing_log_option)
            if block is not None:
                self._log.info(block)
        if self.rank == 0 and lc.log_throughput:
            throughput = self._throughput(timing)
            if throughput is not None:  # Megatron Bridge's rank-0 summary of the interval
                per_step = timing.elapsed_s / max(1, timing.iterations)
                tflops = throughput["tflops"]
                self._log.info(f"Step Time : {per_step:.2f}s GPU utilization: {tflops:.1f}MODEL_TFLOP/s/GPU")
        if not self._memory_reported:
            self._memory_reported = True
            # CUDA only: memory_report() is empty on CPU, where no line is printed.
            report = memory_report(
                self.device, self.cfg.logger.memory_keys, device_used=lc.log_device_memory_used
            )
            if report and self._reports_memory:
                self._log.info(format_memory_line(self.rank, records[-1].step, report))
            if report and self.rank == 0:  # the estimate to compare the measured line with
                line = theoretical_memory_line(self.cfg)
                if line is not None:
                    self._log.info(line)

    def _throughput(self, timing: IntervalTiming) -> dict[str, float] | None:
        if timing.elapsed_s <= 0:
            return None
        per_device_flops = timing.flops / timing.elapsed_s / self.world_size
        out = {
            "tflops": per_device_flops / 1e12,
            "tokens": timing.tokens / timing.elapsed_s / self.world_size,
        }
        if self.peak_flops_per_device:
            out["mfu"] = 100.0 * per_device_flops / self.peak_flops_per_device
        return out

    def _train_line(self, records: list[StepRecord], timing: IntervalTiming, per_step: float) -> str:
        last = records[-1]
        return format_train_line(
            step=last.step,
            train_iters=self.train_iters,
            consumed_samples=last.consumed_samples,
            ms_per_iteration=per_step * 1000.0,
            throughput=self._throughput(timing) if self.cfg.logger.log_throughput else None,
            learning_rate=last.learning_rate,
            decoupled_learning_rate=last.decoupled_learning_rate,
            global_batch_size=last.global_batch_size,
            losses=_average_losses(records),
            loss_scale=last.loss_scale,
            grad_norm=last.grad_norm,
            num_zeros=last.num_zeros,
            params_norm=last.params_norm,
            skipped=sum(r.skipped for r in records),
            nan=sum(r.nan for r in records),
        )

    def _write_record(self, r: StepRecord) -> None:
        """The per-step scalars under Megatron's names (and "<name> vs samples" twins)."""
        lc = self.cfg.logger
        m = self._metrics
        both: list[tuple[str, float]] = [
            ("learning-rate", r.learning_rate),
            ("batch-size", r.global_batch_size),
        ]
        both += list(r.losses.items())
        if lc.log_loss_scale_to_tensorboard and r.loss_scale is not None:
            both.append(("loss-scale", r.loss_scale))
        for name, value in (
            ("grad-norm", r.grad_norm),
            ("num-zeros", r.num_zeros),
            ("params-norm", r.params_norm),
        ):
            if value is not None:
                both.append((name, value))
        if lc.log_world_size_to_tensorboard:
            both.append(("world-size", self.world_size))
        for name, value in both:
            m.scalar(name, value, r.step)
            m.scalar_vs_samples(name, value, r.consumed_samples)
        if r.decoupled_learning_rate is not None:
            m.scalar("decoupled-learning-rate", r.decoupled_learning_rate, r.step)
        m.wandb_scalar("samples vs steps", r.consumed_samples, r.step)

    def _write_step_metrics(self, records: list[StepRecord], timing: IntervalTiming, per_step: float) -> None:
        lc = self.cfg.logger
        tokens_per_step = timing.tokens / max(1, timing.iterations)
        now = time.monotonic() - self._start
        memory_every = lc.log_memory_interval or lc.tensorboard_log_interval
        memory_step = None
        for i, r in enumerate(records):
            self._window.add(per_step, r.global_batch_size, tokens_per_step)
            if not self._metrics.active:
                continue
            if r.step % memory_every == 0:
                memory_step = r.step
            if r.step % lc.tensorboard_log_interval != 0:
                continue
            self._write_record(r)
            if lc.log_throughput_to_tensorboard:
                window = self._window.metrics(self.world_size)
                if self.cfg.train.micro_batch_size is not None:  # set by validate()
                    window["throughput/micro_batch_size"] = self.cfg.train.micro_batch_size
                window["throughput/global_batch_size"] = r.global_batch_size
                self._metrics.scalars(window, r.step)
            if lc.log_runtime_to_tensorboard:
                seq = self.cfg.model.seq_length  # the model owns the sequence length
                runtime = runtime_metrics(
                    # this step ended (steps after it in the interval) x (time per step) ago
                    elapsed_s=max(0.0, now - (len(records) - 1 - i) * per_step),
                    step=r.step,
                    start_step=self.start_step,
                    train_iters=self.train_iters,
                    consumed_samples=r.consumed_samples,
                    tokens=r.consumed_samples * seq if seq else 0,
                    unit=lc.runtime_time_unit,
                )
                self._metrics.scalars(runtime, r.step)
        if memory_step is not None:
            self._write_memory(memory_step)

    def _write_memory(self, step: int) -> None:
        """memory/<name> (log_memory_to_tensorboard) and memory/device_memory_used (log_device_memory_used).

        The statistics are read now, once, and recorded at the interval's last step that falls on
        log_memory_interval. CUDA only: on CPU nothing is written.
        """
        lc = self.cfg.logger
        if not (lc.log_memory_to_tensorboard or lc.log_device_memory_used):
            return
        report = memory_report(self.device, lc.memory_keys, device_used=lc.log_device_memory_used)
        if not lc.log_memory_to_tensorboard:
            report = {k: v for k, v in report.items() if k == DEVICE_MEMORY_USED}
        self._metrics.scalars({f"memory/{k}": v for k, v in report.items()}, step)

    def _write_interval_metrics(self, step: int, timing: IntervalTiming, per_step: float) -> None:
        lc = self.cfg.logger
        if not self._metrics.active:
            return
        if lc.log_throughput_to_tensorboard:
            tput = self._throughput(timing)
            if tput is not None:
                self._metrics.scalar("throughput/tflops/device", tput["tflops"], step)
                self._metrics.scalar("throughput/tflops", tput["tflops"] * self.world_size, step)
                if "mfu" in tput:
                    self._metrics.scalar("throughput/mfu", tput["mfu"], step)
        if lc.log_timers_to_tensorboard:
            self._metrics.scalar("iteration-time", per_step, step)
            for name, (_, slowest) in timing.timers.items():
                self._metrics.scalar(f"{name}-time", slowest, step)

    # ------------------------------------------------------------------ evaluation and the rest

    def log_evaluation(
        self,
        step: int,
        consumed_samples: int,
        losses: dict[str, float],
        *,
        split: Literal["validation", "test"],
    ) -> None:
        """Print the validation box and write `<key> validation` (or `<key> test`) metrics.

        `consumed_samples` are the training samples consumed so far (the "vs samples" x value).
        """
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test' (got {split!r})")
        if not self.is_last_rank or self._closed:
            return
        for line in format_evaluation_box(step, losses, split):
            self._log.info(line)
        m = self._metrics
        for key, value in losses.items():
            values = {f"{key} {split}": value}
            if self.cfg.logger.log_validation_ppl_to_tensorboard:
                values[f"{key} {split} ppl"] = perplexity(value)
            for name, v in values.items():
                m.scalar(name, v, step)
                m.scalar_vs_samples(name, v, consumed_samples)
        m.commit()

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Extra metrics at `step` on the last rank (e.g. per-layer gradient norms)."""
        if self.is_last_rank and not self._closed:
            self._metrics.scalars(values, step)
            self._metrics.commit()

    def progress(self, step: int) -> None:
        """Advance the progress bar to `step` (every step; host only and cheap)."""
        if self._bar is not None:
            self._bar.update_to(step)

    def info(self, message: str) -> None:
        """A message printed by rank 0 (above the progress bar when one is shown)."""
        if self.rank == 0:
            self._log.info(message)

    def close(self) -> None:
        """Flush and close TensorBoard, W&B and the progress bar; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._metrics.close()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
