"""Metrics backends (TensorBoard, W&B, MLflow, Comet) and the derived throughput / runtime metrics.

Backends live on the last rank only and are created on first use. TensorBoard
receives every scalar at its step and the "... vs samples" scalars with consumed samples as the x
value. W&B cannot take a second x axis (its steps must grow), so it receives the step-indexed
scalars only, plus "samples vs steps" to plot against; its values are buffered per step and sent
in step order by `commit()`. MLflow and Comet receive the same as W&B, from the same buffer.
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import TYPE_CHECKING, Any

from viaduct.config import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer
    from viaduct.training.config.logger import LoggerConfig
    from viaduct.training.logging.comet_writer import CometWriter
    from viaduct.training.logging.mlflow_writer import MlflowWriter

TIME_UNITS: dict[str, float] = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0, "days": 86400.0}


def check_backends(cfg: LoggerConfig) -> None:
    """Raise one ConfigError if an enabled backend's package is not installed.

    Run on every rank (not only the last, where the backends live) so that all ranks stop with
    the same message instead of the others waiting in a collective for the one that failed.
    """
    problems: list[Problem] = []
    if cfg.tensorboard_dir is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            problems.append(
                Problem(
                    "logger.tensorboard_dir",
                    "TensorBoard logging needs the tensorboard package, which is not installed",
                    cfg.tensorboard_dir,
                    fix="pip install tensorboard, or set logger.tensorboard_dir to None",
                )
            )
    if cfg.wandb_project is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            problems.append(
                Problem(
                    "logger.wandb_project",
                    "Weights & Biases logging needs the wandb package, which is not installed",
                    cfg.wandb_project,
                    fix='pip install "viaduct[wandb]", or set logger.wandb_project to None',
                )
            )
    problems += [q.prefixed("logger") for q in cfg.package_problems()]
    if problems:
        raise ConfigError(problems)


_SECRETS = ("logger.comet_api_key",)
"""Config values never sent to a metrics backend (they would show in its parameter tables)."""


def flat_params(cfg: ConfigContainer) -> dict[str, object]:
    """The configuration as dotted path -> value, secrets masked: the params of MLflow and Comet runs."""
    from viaduct.config.diff import flatten

    flat = flatten(cfg.to_dict())
    for key in _SECRETS:
        if flat.get(key) is not None:
            flat[key] = "<hidden>"
    return flat


def wandb_dir(cfg: ConfigContainer) -> str:
    """logger.wandb_save_dir, else <checkpoint.save>/wandb, else ./wandb."""
    if cfg.logger.wandb_save_dir:
        return cfg.logger.wandb_save_dir
    if cfg.checkpoint.save:
        return os.path.join(cfg.checkpoint.save, "wandb")
    return os.path.join(os.getcwd(), "wandb")


def _json_config(cfg: ConfigContainer) -> dict[str, Any]:
    # The plain to_dict() (not the YAML form), made JSON-safe: W&B shows it in its config panel.
    data = json.loads(json.dumps(cfg.to_dict(), default=str))
    if data.get("logger", {}).get("comet_api_key") is not None:
        data["logger"]["comet_api_key"] = "<hidden>"
    return data


class MetricsWriter:
    """TensorBoard, W&B, MLflow and Comet behind one `scalar()` call; does nothing unless `enabled`."""

    def __init__(self, cfg: ConfigContainer, *, enabled: bool) -> None:
        self._cfg = cfg
        self._tb_dir = cfg.logger.tensorboard_dir if enabled else None
        self._wandb_project = cfg.logger.wandb_project if enabled else None
        self._mlflow_experiment = cfg.logger.mlflow_experiment if enabled else None
        self._mlflow: MlflowWriter | None = None
        self._comet_project = cfg.logger.comet_project if enabled else None
        self._comet: CometWriter | None = None
        self._tb: Any = None
        self._run: Any = None
        self._pending: dict[int, dict[str, float]] = {}
        self._closed = False

    @property
    def active(self) -> bool:
        """True when at least one backend is configured (and not closed)."""
        return not self._closed and (
            self._tb_dir is not None
            or self._wandb_project is not None
            or self._mlflow_experiment is not None
            or self._comet_project is not None
        )

    @property
    def _buffered(self) -> bool:
        # The step-indexed backends, which take one request per step from the buffer.
        return (
            self._wandb_project is not None
            or self._mlflow_experiment is not None
            or self._comet_project is not None
        )

    @property
    def mlflow(self) -> MlflowWriter | None:
        """The MLflow writer (its run created on first use), or None without logger.mlflow_experiment."""
        if self._mlflow is None and self._mlflow_experiment is not None and not self._closed:
            from viaduct.training.logging.mlflow_writer import MlflowWriter

            self._mlflow = MlflowWriter(self._cfg, flat_params(self._cfg))
        return self._mlflow

    @property
    def comet(self) -> CometWriter | None:
        """The Comet writer (its experiment created on first use), or None without logger.comet_project."""
        if self._comet is None and self._comet_project is not None and not self._closed:
            from viaduct.training.logging.comet_writer import CometWriter

            self._comet = CometWriter(self._cfg, flat_params(self._cfg))
        return self._comet

    @property
    def tensorboard(self) -> Any:
        """The SummaryWriter (created on first use), or None without logger.tensorboard_dir."""
        if self._tb is None and self._tb_dir is not None and not self._closed:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self._tb_dir, max_queue=self._cfg.logger.tensorboard_queue_size)
        return self._tb

    @property
    def wandb_run(self) -> Any:
        """The W&B run (created on first use), or None without logger.wandb_project.

        WANDB_MODE=offline (and W&B's other environment variables) apply as usual.
        """
        if self._run is None and self._wandb_project is not None and not self._closed:
            import wandb

            lc = self._cfg.logger
            save_dir = wandb_dir(self._cfg)
            os.makedirs(save_dir, exist_ok=True)
            self._run = wandb.init(
                project=lc.wandb_project,
                name=lc.wandb_exp_name,
                entity=lc.wandb_entity,
                dir=save_dir,
                config=_json_config(self._cfg),
            )
        return self._run

    def scalar(self, name: str, value: float, step: int) -> None:
        """Record `name` = `value` at iteration `step` in every backend."""
        if not self.active:
            return
        value = float(value)
        if self._tb_dir is not None:
            self.tensorboard.add_scalar(name, value, step)
        if self._buffered:
            self._pending.setdefault(step, {})[name] = value

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.scalar(name, value, step)

    def scalar_vs_samples(self, name: str, value: float, consumed_samples: int) -> None:
        """Record `<name> vs samples` with consumed samples as the x value (TensorBoard only)."""
        if self.active and self._tb_dir is not None:
            self.tensorboard.add_scalar(f"{name} vs samples", float(value), consumed_samples)

    def wandb_scalar(self, name: str, value: float, step: int) -> None:
        """Record a scalar for the step-indexed backends only (W&B, MLflow, Comet).

        E.g. "samples vs steps", which TensorBoard plots natively.
        """
        if self.active and self._buffered:
            self._pending.setdefault(step, {})[name] = float(value)

    def commit(self) -> None:
        """Send the buffered W&B / MLflow / Comet values, one `log` per step in increasing step order."""
        if self._pending and self.wandb_run is not None:
            for step in sorted(self._pending):
                self._run.log(self._pending[step], step=step)
        for writer in (self.mlflow, self.comet) if self._pending else ():
            if writer is not None:
                for step in sorted(self._pending):
                    writer.log(self._pending[step], step=step)
        self._pending.clear()

    def flush(self) -> None:
        self.commit()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the backends; later calls (and later scalars) do nothing."""
        if self._closed:
            return
        self.commit()
        self._closed = True
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._run is not None:
            self._run.finish()
            self._run = None
        if self._mlflow is not None:
            self._mlflow.close()
            self._mlflow = None
        if self._comet is not None:
            self._comet.close()
            self._comet = None


class ThroughputWindow:
    """Rolling sums over the last `size` steps, for `throughput/*` (log_throughput_to_tensorboard).

    The loop reports time, tokens and FLOPs per log interval, not per step, so each step of an
    interval gets an equal share; samples are each step's global batch size.
    """

    def __init__(self, size: int) -> None:
        self._steps: deque[tuple[float, int, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, seconds: float, samples: int, tokens: float) -> None:
        self._steps.append((seconds, samples, tokens))

    def metrics(self, world_size: int) -> dict[str, float]:
        """Rates over the window (as soon as it holds one step; it need not be full)."""
        seconds = sum(s for s, _, _ in self._steps)
        if seconds <= 0:
            return {}
        batches = len(self._steps)
        samples = sum(n for _, n, _ in self._steps)
        tokens = sum(t for _, _, t in self._steps)
        out = {
            "throughput/batches_per_sec": batches / seconds,
            "throughput/samples_per_sec": samples / seconds,
            "throughput/device/batches_per_sec": batches / seconds / world_size,
            "throughput/device/samples_per_sec": samples / seconds / world_size,
        }
        if tokens > 0:
            out["throughput/tokens_per_sec"] = tokens / seconds
            out["throughput/device/tokens_per_sec"] = tokens / seconds / world_size
        return out


def runtime_metrics(
    *,
    elapsed_s: float,
    step: int,
    start_step: int,
    train_iters: int,
    consumed_samples: int,
    tokens: float,
    unit: str,
) -> dict[str, float]:
    """`time/*` metrics (log_runtime_to_tensorboard), times in `unit` (runtime_time_unit).

    The remaining time is extrapolated from this job's own pace (steps since `start_step`), so a
    resumed run does not count the earlier jobs' steps as done in this job's time.
    """
    divider = TIME_UNITS[unit]
    done = step - start_step
    remaining = elapsed_s / done * max(train_iters - step, 0) if done > 0 else 0.0
    return {
        "time/remaining_estimate": remaining / divider,
        "time/tokens": float(tokens),
        "time/samples": float(consumed_samples),
        "time/batches": float(step),
        "time/total": elapsed_s / divider,
    }
