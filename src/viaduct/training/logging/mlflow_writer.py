"""MLflow backend: one run per training job, the flattened config as params, scalars as metrics.

Created on the last rank only (like TensorBoard and W&B) and only when logger.mlflow_experiment is
set; `mlflow` is imported then and not before (`pip install "viaduct[mlflow]"`). Talks to the
tracking store through `MlflowClient` rather than mlflow's global "active run", so a second run in
the same process (or user code using mlflow itself) cannot pick up this run by accident.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer

# MLflow accepts letters, digits, "_", "-", ".", " ", "/" and ":" in metric and param keys.
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
_BATCH = 100  # params per log_batch call (MLflow's limit)


def mlflow_key(name: str) -> str:
    """`name` with the characters MLflow refuses in keys replaced by "_"."""
    return _BAD_KEY_CHARS.sub("_", name)


def _yaml_without_secrets(cfg: ConfigContainer) -> str:
    if cfg.logger.comet_api_key is None:
        return cfg.to_yaml()
    import copy

    public = copy.deepcopy(cfg)
    public.logger.comet_api_key = "<hidden>"
    return public.to_yaml()


class MlflowWriter:
    """Logs scalars of a run to MLflow; `close()` ends the run (FAILED when an exception is in flight)."""

    def __init__(self, cfg: ConfigContainer, params: dict[str, object]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        lc = cfg.logger
        assert lc.mlflow_experiment is not None  # the caller creates a writer only when it is set
        self._client = MlflowClient(tracking_uri=lc.mlflow_tracking_uri)
        experiment = self._client.get_experiment_by_name(lc.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(lc.mlflow_experiment)
        )
        tags = dict(lc.mlflow_tags or {})
        if lc.mlflow_description:
            tags["mlflow.note.content"] = lc.mlflow_description  # MLflow's run-description tag
        run = self._client.create_run(experiment_id, run_name=lc.mlflow_run_name, tags=tags)
        self.run_id: str = run.info.run_id
        """The MLflow run's id."""
        batch = [Param(mlflow_key(k), str(v)[:_MAX_PARAM_VALUE]) for k, v in sorted(params.items())]
        for i in range(0, len(batch), _BATCH):
            self._client.log_batch(self.run_id, params=batch[i : i + _BATCH])
        if lc.mlflow_log_artifacts:
            self._client.log_text(self.run_id, _yaml_without_secrets(cfg), "config.yaml")
        self._closed = False

    def log(self, values: dict[str, float], step: int) -> None:
        """Record `values` at iteration `step` (one request for all of them)."""
        if self._closed or not values:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit on metrics per batch
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self) -> None:
        """End the run: KILLED on an interrupt, FAILED on another exception in flight, else FINISHED."""
        if self._closed:
            return
        self._closed = True
        exc = sys.exc_info()[1]
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            status = "FINISHED"
        elif isinstance(exc, KeyboardInterrupt | SystemExit):
            status = "KILLED"
        else:
            status = "FAILED"
        self._client.set_terminated(self.run_id, status)
