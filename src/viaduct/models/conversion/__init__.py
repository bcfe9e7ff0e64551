"""Hugging Face checkpoints in and out of viaduct (Megatron Bridge's `AutoBridge`); see docs/conversion.md.

Names are imported on first use: the config-side modules (`hf_config`, `provider_config`) are read by
validation, which does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viaduct.models.conversion.auto_bridge import AutoBridge
    from viaduct.models.conversion.hf_config import SUPPORTED_ARCHITECTURES

_WHERE = {"AutoBridge": "auto_bridge", "SUPPORTED_ARCHITECTURES": "hf_config"}

__all__ = ["SUPPORTED_ARCHITECTURES", "AutoBridge"]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(importlib.import_module(f"viaduct.models.conversion.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'viaduct.models.conversion' has no attribute {name!r}")
