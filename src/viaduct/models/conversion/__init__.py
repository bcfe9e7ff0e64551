"""Hugging Face checkpoints in and out of viaduct (Megatron Bridge's `AutoBridge`); see docs/conversion.md."""

from viaduct.models.conversion.auto_bridge import AutoBridge
from viaduct.models.conversion.hf_config import SUPPORTED_ARCHITECTURES

__all__ = ["SUPPORTED_ARCHITECTURES", "AutoBridge"]
