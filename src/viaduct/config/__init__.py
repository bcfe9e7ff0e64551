"""Generic configuration machinery; knows nothing of training.

Base class, `_target_` YAML codec, overrides, argparse, errors, provenance, schema and diff.
Importing it does not import torch.
"""

from viaduct.config.base import ConfigBase, allow_infinity, derived, unsupported
from viaduct.config.errors import (
    ConfigError,
    ConfigFileNotFoundError,
    ConfigWarning,
    Problem,
    Problems,
    fields_with_problems,
)
from viaduct.config.interpolation import resolve_interpolations
from viaduct.config.overrides import apply_overrides, process_config_with_overrides
from viaduct.config.targets import register_target, register_target_prefix
from viaduct.config.types import DType, FunctionRef

__all__ = [
    "ConfigBase",
    "ConfigError",
    "ConfigFileNotFoundError",
    "ConfigWarning",
    "DType",
    "FunctionRef",
    "Problem",
    "Problems",
    "allow_infinity",
    "apply_overrides",
    "derived",
    "fields_with_problems",
    "process_config_with_overrides",
    "register_target",
    "register_target_prefix",
    "resolve_interpolations",
    "unsupported",
]
