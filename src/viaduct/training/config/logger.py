"""`logger`: console logging, timers, TensorBoard, Weights & Biases, MLflow and Comet.

The `*_to_tensorboard` switches choose metrics for every metrics backend (TensorBoard, W&B, MLflow
and Comet), as in Megatron.
"""

import importlib.util
import logging
import sys
from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problem, Problems, unsupported
from viaduct.training.config._checks import positive


def _installed(name: str) -> bool:
    # Looked up, not imported: validating a config should not pay for importing mlflow (or need torch).
    if name in sys.modules:
        return sys.modules[name] is not None  # None: an import of it already failed (or was blocked)
    return importlib.util.find_spec(name) is not None


@dataclass(kw_only=True)
class LoggerConfig(ConfigBase):
    """Console logging, timers and metrics backends (TensorBoard, Weights & Biases)."""

    _component_: ClassVar[str] = "logger"

    log_interval: int = 100
    """Print loss, learning rate and timing every this many steps."""

    log_params_norm: bool = False
    """Compute and log the L2 norm of the parameters."""

    log_throughput: bool = False
    """Add throughput (TFLOP/s per GPU, MFU) to the console line."""

    log_throughput_to_tensorboard: bool = False
    """Log rolling samples/tokens/batches per second to the metrics backends."""

    throughput_window_size: int = 100
    """Steps in the rolling throughput average."""

    log_progress: bool = False
    """Append tokens and FLOPs done so far to progress.txt in the checkpoint directory."""

    timing_log_level: Literal[0, 1, 2] = 0
    """Timer detail: 0 step time only, 1 once-per-step operations, 2 fine-grained (slower)."""

    timing_log_option: Literal["max", "minmax", "all"] = "minmax"
    """How timers are reported across ranks: the maximum, minimum and maximum, or every rank."""

    barrier_with_L1_time: bool = True
    """Synchronize ranks around level-1 timers so they measure the slowest rank."""

    tensorboard_dir: str | None = None
    """Write TensorBoard event files here (enables TensorBoard)."""

    tensorboard_log_interval: int = 1
    """Write metrics to the backends every this many steps."""

    tensorboard_queue_size: int = 1000
    """Pending TensorBoard events before a flush to disk."""

    log_timers_to_tensorboard: bool = False
    """Log timers to the metrics backends."""

    log_loss_scale_to_tensorboard: bool = True
    """Log the loss scale to the metrics backends."""

    log_validation_ppl_to_tensorboard: bool = False
    """Log validation perplexity to the metrics backends."""

    log_memory_to_tensorboard: bool = False
    """Log accelerator memory statistics to the metrics backends."""

    memory_keys: dict[str, str] | None = None
    """Statistics of torch.cuda.memory_stats() to log, mapped to metric names; None logs a default set."""

    log_memory_interval: int | None = None
    """Log memory statistics every this many steps; None uses tensorboard_log_interval."""

    log_device_memory_used: bool = False
    """Log device memory in use as the driver reports it (all processes, not only PyTorch's allocator)."""

    log_l2_norm_grad_to_tensorboard: bool = False
    """Log the gradient L2 norm of each layer to the metrics backends."""

    log_runtime_to_tensorboard: bool = False
    """Log elapsed time and estimated time to completion to the metrics backends."""

    runtime_time_unit: Literal["seconds", "minutes", "hours", "days"] = "hours"
    """Unit of the runtime metrics."""

    log_world_size_to_tensorboard: bool = False
    """Log the number of ranks to the metrics backends."""

    wandb_project: str | None = None
    """Weights & Biases project (enables W&B)."""

    wandb_exp_name: str | None = None
    """Weights & Biases run name."""

    wandb_entity: str | None = None
    """Weights & Biases entity (team or user)."""

    wandb_save_dir: str | None = None
    """Local directory for Weights & Biases files."""

    logging_level: int = logging.INFO
    """Python logging level (10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR)."""

    filter_warnings: bool = True
    """Hide repeated third-party warnings."""

    modules_to_filter: list[str] | None = None
    """Logger names whose messages are dropped."""

    set_level_for_all_loggers: bool = False
    """Apply logging_level to every Python logger, not only viaduct's."""

    save_config_filepath: str | None = None
    """Rank 0 writes the validated configuration as YAML to this file at setup."""

    skip_train_metrics_log: bool = False
    """Do not log training metrics anywhere (evaluation is still logged)."""

    log_max_attention_logit: bool = unsupported("logging the maximum attention logit", default=False)
    """Log the largest pre-softmax attention logit."""

    log_energy: bool = unsupported("energy logging", default=False)
    """Log energy used by the GPUs (NVML)."""

    mlflow_experiment: str | None = None
    """MLflow experiment name (enables MLflow)."""

    mlflow_run_name: str | None = None
    """MLflow run name."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (a server, or file:///path); None uses MLFLOW_TRACKING_URI or MLflow's default."""

    mlflow_tags: dict[str, str] | None = None
    """Tags of the MLflow run."""

    mlflow_description: str | None = None
    """Description of the MLflow run."""

    mlflow_log_artifacts: bool = True
    """Upload the run's configuration (config.yaml) to the MLflow run; checkpoints are not uploaded."""

    comet_project: str | None = None
    """Comet project (enables Comet)."""

    comet_experiment_name: str | None = None
    """Comet experiment name."""

    comet_workspace: str | None = None
    """Comet workspace."""

    comet_api_key: str | None = None
    """Comet API key; None uses COMET_API_KEY (it is never sent to a metrics backend)."""

    comet_tags: list[str] | None = None
    """Tags of the Comet experiment."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "log_num_zeros_in_grad": "one owner: optimizer.log_num_zeros_in_grad",
        **{
            f"moe_routing_trace_{s}": "mixture-of-experts models are not built"
            for s in ("path", "max_training_iters", "capture_logits", "capture_hidden_states", "dump_weights")
        },
    }

    def finalize(self) -> None:
        """Check intervals, that W&B / MLflow details come with their switch, and MLflow's package."""
        p = Problems()
        for name in (
            "log_interval",
            "throughput_window_size",
            "tensorboard_log_interval",
            "tensorboard_queue_size",
            "log_memory_interval",
        ):
            positive(p, self, name)
        positive(p, self, "logging_level", zero_ok=True)
        if self.wandb_project is None:
            for name in ("wandb_exp_name", "wandb_entity", "wandb_save_dir"):
                if getattr(self, name) is not None:
                    p.add(
                        name,
                        "has no effect: W&B is enabled by wandb_project, which is not set",
                        getattr(self, name),
                        fix=f"set logger.wandb_project, or remove logger.{name}",
                    )
        elif not self.wandb_project.strip():
            p.add(
                "wandb_project",
                "is empty",
                self.wandb_project,
                fix="set logger.wandb_project to a project name",
            )
        self._mlflow_problems(p)
        self._comet_problems(p)
        p.extend(self.package_problems())
        p.raise_if_any()

    def package_problems(self) -> list[Problem]:
        """Optional packages that the configured MLflow / Comet logging needs and that are missing.

        Asked by finalize() and again when a run sets up its logging, so `viaduct config validate`
        refuses what a run would.
        """
        p = Problems()
        if self.mlflow_experiment is not None and not _installed("mlflow"):
            p.add(
                "mlflow_experiment",
                "MLflow logging needs the mlflow package, which is not installed",
                self.mlflow_experiment,
                fix='pip install "viaduct[mlflow]", or set logger.mlflow_experiment to None',
            )
        if self.comet_project is not None and not _installed("comet_ml"):
            p.add(
                "comet_project",
                "Comet logging needs the comet_ml package, which is not installed",
                self.comet_project,
                fix='pip install "viaduct[comet]", or set logger.comet_project to None',
            )
        return p.items

    def _comet_problems(self, p: Problems) -> None:
        details = ("comet_experiment_name", "comet_workspace", "comet_api_key", "comet_tags")
        if self.comet_project is None:
            for name in details:
                if getattr(self, name) is not None:
                    p.add(
                        name,
                        "has no effect: Comet is enabled by comet_project, which is not set",
                        "<hidden>" if name == "comet_api_key" else getattr(self, name),
                        fix=f"set logger.comet_project, or remove logger.{name}",
                    )
            return
        if not self.comet_project.strip():
            p.add(
                "comet_project",
                "is empty",
                self.comet_project,
                fix="set logger.comet_project to a project name",
            )
        if self.comet_experiment_name is None or not self.comet_experiment_name.strip():
            p.add(
                "comet_experiment_name",
                "is required with logger.comet_project (experiments are told apart by name)",
                self.comet_experiment_name,
                fix="set logger.comet_experiment_name to an experiment name",
            )

    def _mlflow_problems(self, p: Problems) -> None:
        details = ("mlflow_run_name", "mlflow_tracking_uri", "mlflow_tags", "mlflow_description")
        if self.mlflow_experiment is None:
            for name in details:
                if getattr(self, name) is not None:
                    p.add(
                        name,
                        "has no effect: MLflow is enabled by mlflow_experiment, which is not set",
                        getattr(self, name),
                        fix=f"set logger.mlflow_experiment, or remove logger.{name}",
                    )
            return
        if not self.mlflow_experiment.strip():
            p.add(
                "mlflow_experiment",
                "is empty",
                self.mlflow_experiment,
                fix="set logger.mlflow_experiment to an experiment name",
            )
        if self.mlflow_run_name is None or not self.mlflow_run_name.strip():
            p.add(
                "mlflow_run_name",
                "is required with logger.mlflow_experiment (runs are told apart by name)",
                self.mlflow_run_name,
                fix="set logger.mlflow_run_name to a run name",
            )
