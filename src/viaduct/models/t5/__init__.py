"""T5-style encoder-decoder models: the provider (configuration) and the model.

The providers import eagerly and without torch, so that `viaduct.models` (and every configuration
that names a T5 provider) loads without it; the model code is imported on first use of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from viaduct.models.t5.provider import (
    T5ModelProvider,
    T5ModelProvider3B,
    T5ModelProvider11B,
    T5ModelProvider220M,
    t5_provider_num_parameters,
)

if TYPE_CHECKING:
    from viaduct.models.t5.attention import CrossAttention, RelativePositionBias, relative_position_bucket
    from viaduct.models.t5.model import T5Model, T5Spec, t5_num_parameters

# Names of the model code (which imports torch) -> the module that defines them.
_LAZY = {
    "CrossAttention": "viaduct.models.t5.attention",
    "RelativePositionBias": "viaduct.models.t5.attention",
    "relative_position_bucket": "viaduct.models.t5.attention",
    "T5Model": "viaduct.models.t5.model",
    "T5Spec": "viaduct.models.t5.model",
    "t5_num_parameters": "viaduct.models.t5.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CrossAttention",
    "RelativePositionBias",
    "T5Model",
    "T5ModelProvider",
    "T5ModelProvider3B",
    "T5ModelProvider11B",
    "T5ModelProvider220M",
    "T5Spec",
    "relative_position_bucket",
    "t5_num_parameters",
    "t5_provider_num_parameters",
]
