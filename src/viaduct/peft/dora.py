"""DoRA: weight-decomposed low-rank adaptation (a learned magnitude times a LoRA-updated direction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from viaduct.config import Problems
from viaduct.peft.base import PEFT, ModuleMatcher, check_low_rank


@dataclass(kw_only=True)
class DoRA(PEFT, ModuleMatcher):
    """DoRA: output = magnitude x normalize(W + (alpha / dim) B A), with a per-output-channel magnitude."""

    _aliases_ = ("dora",)

    dim: int = 32
    """Adapter rank."""
    alpha: float = 64.0
    """Scale numerator: the low-rank update is multiplied by alpha / dim."""
    dropout: float = 0.0
    """Dropout probability on the adapter path."""
    dropout_position: Literal["pre", "post"] = "pre"
    """Apply the dropout before the A matrix (pre) or after the B matrix (post)."""
    lora_A_init_method: Literal["xavier", "normal", "kaiming", "zero"] = "xavier"
    """Initialization of A (in -> dim): xavier-normal, normal(0, 0.2), kaiming-uniform or zero."""
    lora_B_init_method: Literal["xavier", "normal", "kaiming", "zero"] = "zero"
    """Initialization of B (dim -> out); zero makes the adapted model start equal to the base."""

    def _check(self, p: Problems, bad: set[str]) -> None:
        self._check_matcher(p, bad)
        check_low_rank(self, p, bad)
