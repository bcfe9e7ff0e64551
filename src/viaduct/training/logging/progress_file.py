"""`<checkpoint.save>/progress.txt` (logger.log_progress), in Megatron's format.

One tab-separated line per event: `time  Job ID: <SLURM_JOB_ID>  # GPUs: <n>  <event> ...`. A job
start writes "Starting job"; each checkpoint writes the job's throughput, the cumulative
throughput since the first job with the same number of GPUs, the FLOPs and the tokens so far.
Megatron's tools parse these lines, so the field order is kept.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
START = "Starting job"
SAVED = "Saved checkpoint"
SAVING_ASYNC = "Saving async checkpoint"


def _field(token: str) -> str:
    return token.split(": ", 1)[1]


class ProgressFile:
    """Appends job-start and checkpoint lines to `<save_dir>/progress.txt`.

    Call it on one rank only (rank 0); `from_config` returns None on the others.
    """

    def __init__(self, save_dir: str | os.PathLike[str]) -> None:
        self.path = Path(save_dir) / "progress.txt"
        self._job_start_flops = 0.0

    @classmethod
    def from_config(cls, cfg: ConfigContainer, *, rank: int) -> ProgressFile | None:
        """A ProgressFile when logger.log_progress and checkpoint.save are set and rank is 0."""
        if not cfg.logger.log_progress or not cfg.checkpoint.save or rank != 0:
            return None
        return cls(cfg.checkpoint.save)

    def _append(self, world_size: int, text: str, now: datetime | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = (now or datetime.now()).strftime(_TIME_FORMAT)
        job_id = os.environ.get("SLURM_JOB_ID", "")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{stamp}\tJob ID: {job_id}\t# GPUs: {world_size}\t{text}\n")

    def _latest_checkpoint_flops(self) -> float:
        flops = 0.0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                tokens = line.split("\t")
                if len(tokens) > 7 and tokens[3] in (SAVED, SAVING_ASYNC):
                    flops = float(_field(tokens[7]))
        return flops

    def job_start(self, step: int, world_size: int, *, flops_so_far: float | None = None) -> None:
        """Record that a job starts (at iteration `step`).

        `flops_so_far` are the FLOPs the run had done when this job started (the resumed
        checkpoint's); without it the last checkpoint line of the file is used, as Megatron does.
        """
        self._job_start_flops = self._latest_checkpoint_flops() if flops_so_far is None else flops_so_far
        self._append(world_size, f"{START}\tIteration: {step}")

    def _cumulative_start(self, world_size: int) -> tuple[datetime, float] | None:
        """Time and FLOPs at the first job start of the latest run of jobs with this world size."""
        start: tuple[datetime, float] | None = None
        latest_flops = 0.0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            tokens = line.split("\t")
            if len(tokens) < 4:
                continue
            if tokens[3] in (SAVED, SAVING_ASYNC) and len(tokens) > 7:
                latest_flops = float(_field(tokens[7]))
            if int(_field(tokens[2])) != world_size:
                start = None  # a different GPU count restarts the cumulative window
                continue
            if tokens[3] == START and start is None:
                start = (datetime.strptime(tokens[0], _TIME_FORMAT), latest_flops)
        return start

    def checkpoint_saved(
        self,
        step: int,
        consumed_samples: int,
        tokens: int,
        flops_so_far: float,
        elapsed_s: float,
        world_size: int,
        *,
        async_save: bool = False,
    ) -> None:
        """Record a checkpoint at `step`: job / cumulative TFLOP/s per GPU, FLOPs and tokens so far.

        `elapsed_s` is the wall-clock time since this job started, `tokens` the run's tokens so
        far, `flops_so_far` the run's FLOPs so far (train_state.floating_point_operations_so_far).
        """
        now = datetime.now()
        job_flops = flops_so_far - self._job_start_flops
        job_tput = job_flops / (max(elapsed_s, 1e-9) * 1e12 * world_size)
        cumulative = self._cumulative_start(world_size) if self.path.exists() else None
        if cumulative is not None:
            start_time, start_flops = cumulative
            seconds = max((now - start_time).total_seconds(), elapsed_s, 1e-9)
            cum_tput = (flops_so_far - start_flops) / (seconds * 1e12 * world_size)
        else:
            cum_tput = job_tput
        prefix = SAVING_ASYNC if async_save else SAVED
        self._append(
            world_size,
            f"{prefix}\tIteration: {step}\t"
            f"Job throughput: {job_tput:.1f} TFLOP/s/GPU\t"
            f"Cumulative throughput: {cum_tput:.1f} TFLOP/s/GPU\t"
            f"Floating-point operations: {flops_so_far:.2e}\t"
            f"Tokens (in billions): {tokens / 1e9:.2f}\t"
            f"Consumed samples: {consumed_samples}",
            now,
        )
