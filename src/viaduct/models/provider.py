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

from viaduct.config import ConfigError, DType, Problem
from viaduct.models.transformer_config import TransformerConfig


@dataclass(kw_only=True)
class ModelProvider(TransformerConfig):
    """A model family's configuration: architecture, parallel sizes and precision."""

    _abstract_config_ = True

    def padded_vocab_size(self) -> int:
        """The output/embedding size: vocab_size, rounded up to make_vocab_size_divisible_by x TP
        when should_pad_vocab is on (padding rows are never a label, so they only cost compute).
        Without it, only as far as tensor parallelism needs: a multiple of the TP size."""
        if self.vocab_size is None:
            raise ConfigError(
                [
                    Problem(
                        "vocab_size",
                        "must be set before the model is built",
                        None,
                        fix="set model.vocab_size, or let the tokenizer fill it in pretrain()",
                    )
                ]
            )
        multiple = self.tensor_model_parallel_size
        if self.should_pad_vocab:
            multiple *= self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

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
