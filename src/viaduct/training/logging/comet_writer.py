"""Comet backend: one experiment per training job, the flattened config as parameters, scalars as metrics.

Created on the last rank only (like TensorBoard, W&B and MLflow) and only when logger.comet_project is
set; `comet_ml` is imported then and not before (`pip install "viaduct[comet]"`). Comet's own
settings apply as usual: COMET_API_KEY when logger.comet_api_key is None, and offline mode with
COMET_START_ONLINE=false (archives under COMET_OFFLINE_DIRECTORY, uploadable later with
`comet upload`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer


class CometWriter:
    """Logs scalars of a run to a Comet experiment; `close()` ends it."""

    def __init__(self, cfg: ConfigContainer, params: dict[str, object]) -> None:
        import comet_ml

        lc = cfg.logger
        # Comet's automatic logging (source code, git patch, stdout, argv, framework hooks) is off: the
        # experiment holds what the other backends get, and nothing of the host it was not asked for.
        settings = comet_ml.ExperimentConfig(
            name=lc.comet_experiment_name,
            tags=list(lc.comet_tags or []),
            log_code=False,
            log_graph=False,
            parse_args=False,
            log_git_metadata=False,
            log_git_patch=False,
            log_env_details=False,
            auto_output_logging=False,  # type: ignore[arg-type]  # Comet's documented "off"
            auto_param_logging=False,
            auto_metric_logging=False,
            auto_log_co2=False,
            display_summary_level=0,
        )
        self._experiment = comet_ml.start(
            api_key=lc.comet_api_key,
            workspace=lc.comet_workspace,
            project_name=lc.comet_project,
            experiment_config=settings,
        )
        self._experiment.log_parameters(params)
        self._closed = False

    def log(self, values: dict[str, float], step: int) -> None:
        """Record `values` at iteration `step`."""
        if not self._closed and values:
            self._experiment.log_metrics(values, step=step)

    def close(self) -> None:
        """End the experiment (an offline one is archived to a zip file then)."""
        if self._closed:
            return
        self._closed = True
        self._experiment.end()
