"""`ModelProvider`: the shared base of the model providers (Megatron Bridge's `ModelProviderMixin`).

A provider is the model's configuration: architecture, parallel sizes and precision
(`TransformerConfig`). The container annotates `model: ModelProvider`, so any family (GPT, T5,
Mamba) fits there; a YAML mapping picks one with `_target_` or a short name (`model=gpt`).
Building the model from it comes with the model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from viaduct.config import DType
from viaduct.models.transformer_config import TransformerConfig


@dataclass(kw_only=True)
class ModelProvider(TransformerConfig):
    """A model family's configuration: architecture, parallel sizes and precision."""

    _abstract_config_ = True

    def apply_overrides_and_finalize(
        self, dtype: Any = None, overrides: Mapping[str, Any] | None = None
    ) -> ModelProvider:
        """Set the precision from `dtype`, apply `overrides`, `finalize()`, and return self.

        `dtype` (torch dtype or a name such as "bf16") sets `params_dtype` and turns `bf16` / `fp16`
        on or off to match. Each override is an attribute assignment, so an unknown name raises
        `AttributeError` with suggestions.
        """
        if dtype is not None:
            d = DType(dtype)
            self.params_dtype = d
            self.bf16 = d == "bfloat16"
            self.fp16 = d == "float16"
        for name, value in (overrides or {}).items():
            setattr(self, name, value)
        self.finalize()
        return self
