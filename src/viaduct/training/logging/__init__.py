"""Logging side of the training loop: console lines, timers, memory, TensorBoard / W&B, progress.

- `TrainingLogger` (+ `StepRecord`, `IntervalTiming`): what the loop calls at each log interval,
  after evaluations, and every step for the progress bar;
- `Timers`: Megatron-style named timers with log levels, summarised across ranks;
- `setup_python_logging(cfg.logger)`: levels, logger filters and warning filters;
- `ProgressFile`: `<checkpoint.save>/progress.txt` (logger.log_progress).
"""

from viaduct.training.logging.console import ProgressDisplay, install_console_handler
from viaduct.training.logging.memory import DEFAULT_MEMORY_KEYS, memory_report
from viaduct.training.logging.metrics import MetricsWriter, check_backends
from viaduct.training.logging.progress_file import ProgressFile
from viaduct.training.logging.setup import setup_python_logging, teardown_python_logging, write_config_file
from viaduct.training.logging.timers import DummyTimer, Timer, Timers
from viaduct.training.logging.training_logger import IntervalTiming, StepRecord, TrainingLogger

__all__ = [
    "DEFAULT_MEMORY_KEYS",
    "DummyTimer",
    "IntervalTiming",
    "MetricsWriter",
    "ProgressDisplay",
    "ProgressFile",
    "StepRecord",
    "Timer",
    "Timers",
    "TrainingLogger",
    "check_backends",
    "install_console_handler",
    "memory_report",
    "setup_python_logging",
    "teardown_python_logging",
    "write_config_file",
]
