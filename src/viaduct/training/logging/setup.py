"""Process-wide logging setup from `cfg.logger`: levels, logger filters, warning filters.

`setup_python_logging(cfg.logger)` is called once per process at the start of `pretrain` (again
after an in-process restart: it replaces what the previous call installed, and
`teardown_python_logging()` removes it).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from viaduct.training.logging.console import CONSOLE_LOGGER, install_console_handler

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer
    from viaduct.training.config.logger import LoggerConfig

# Warnings PyTorch repeats at every step or every loader, with no action for the user to take:
# hidden entirely.
_IGNORED_MESSAGES = (
    # activation checkpointing: asked about on every call unless use_reentrant is passed
    r"torch\.utils\.checkpoint: the use_reentrant parameter should be passed explicitly",
    # activation checkpointing over frozen inputs (PEFT): harmless, gradients flow through weights
    r"None of the inputs have requires_grad=True\. Gradients will be None",
    # DataLoader workers on a small machine
    r"This DataLoader will create \d+ worker processes in total",
    r"TypedStorage is deprecated",
)
# Other warnings raised from these packages: shown once per process instead of once per call site.
_ONCE_MODULES = r"(torch|torchvision|transformers|datasets|tensorboard|wandb)(\..*)?$"


class ModuleFilter(logging.Filter):
    """Drops records of the named loggers and their children ("a.b" drops "a.b" and "a.b.c")."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return not any(name == n or name.startswith(n + ".") for n in self.names)


@dataclass
class _Installed:
    """What the last setup_python_logging call changed, so it can be undone."""

    filter: ModuleFilter | None = None
    filtered: list[Any] = field(default_factory=list)
    warning_filters: list[tuple[Any, ...]] = field(default_factory=list)


_installed = _Installed()


def _all_loggers() -> list[logging.Logger]:
    manager = logging.Logger.manager
    return [logging.getLogger()] + [
        lg
        for lg in (logging.getLogger(n) for n in list(manager.loggerDict))
        if isinstance(lg, logging.Logger)
    ]


def teardown_python_logging() -> None:
    """Remove the module filter and warning filters a previous setup call installed."""
    if _installed.filter is not None:
        for target in _installed.filtered:
            target.removeFilter(_installed.filter)
    for entry in _installed.warning_filters:
        if entry in warnings.filters:
            cast(list, warnings.filters).remove(entry)  # typeshed calls it a Sequence; it is a list
    # Tell the warnings machinery its filter list changed (it caches "already warned" decisions).
    mutated = getattr(warnings, "_filters_mutated", None) or getattr(
        warnings, "_filters_mutated_lock_held", None
    )
    if mutated is not None:
        mutated()
    _installed.filter = None
    _installed.filtered.clear()
    _installed.warning_filters.clear()


def _add_warning_filters() -> list[tuple[Any, ...]]:
    before = list(warnings.filters)
    warnings.filterwarnings("once", category=UserWarning, module=_ONCE_MODULES)
    warnings.filterwarnings("once", category=FutureWarning, module=_ONCE_MODULES)
    for message in _IGNORED_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    return [entry for entry in warnings.filters if entry not in before]


def setup_python_logging(cfg: LoggerConfig) -> None:
    """Apply logger.logging_level, set_level_for_all_loggers, modules_to_filter, filter_warnings.

    - `logging_level` goes on the "viaduct" logger (every viaduct module logs under it), or with
      `set_level_for_all_loggers` on the root logger and every logger that exists now;
    - `modules_to_filter`: a filter dropping those loggers' records is put on every logger and
      every handler that exists now (handlers too, because a filter on a logger does not see
      records that propagate from its children);
    - `filter_warnings`: known noise from PyTorch (checkpoint's use_reentrant notice, DataLoader
      worker counts, ...) is ignored, and other warnings from PyTorch and common third-party
      packages are shown once per process.
    """
    teardown_python_logging()
    install_console_handler()
    if cfg.set_level_for_all_loggers:
        for lg in _all_loggers():
            lg.setLevel(cfg.logging_level)
    else:
        logging.getLogger(CONSOLE_LOGGER).setLevel(cfg.logging_level)

    if cfg.modules_to_filter:
        module_filter = ModuleFilter(list(cfg.modules_to_filter))
        targets: list[Any] = []
        for lg in _all_loggers():
            targets.append(lg)
            targets.extend(lg.handlers)
        for target in dict.fromkeys(targets):  # a handler shared by loggers gets it once
            target.addFilter(module_filter)
        _installed.filter = module_filter
        _installed.filtered = list(dict.fromkeys(targets))

    if cfg.filter_warnings:
        _installed.warning_filters = _add_warning_filters()


def write_config_file(cfg: ConfigContainer, *, rank: int) -> str | None:
    """Rank 0 writes the validated config as YAML to logger.save_config_filepath; returns the path."""
    path = cfg.logger.save_config_filepath
    if path is None or rank != 0:
        return None
    cfg.to_yaml(path)
    logging.getLogger(CONSOLE_LOGGER).info("configuration written to %s", path)
    return path
