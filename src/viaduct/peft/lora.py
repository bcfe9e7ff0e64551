"""LoRA: low-rank adapters, y = W x + (alpha / dim) * B(A(dropout(x)))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from viaduct.config import DType, Problems, unsupported
from viaduct.peft.base import PEFT, ModuleMatcher, check_low_rank


@dataclass(kw_only=True)
class LoRA(PEFT, ModuleMatcher):
    """Low-rank adaptation: a trainable rank-`dim` update beside each matched linear layer."""

    _aliases_ = ("lora",)

    dim: int = 32
    """Adapter rank."""
    alpha: float = 32.0
    """Scale numerator: the adapter output is multiplied by alpha / dim."""
    dropout: float = 0.0
    """Dropout probability on the adapter path."""
    dropout_position: Literal["pre", "post"] = "pre"
    """Apply the dropout before the A matrix (pre) or after the B matrix (post)."""
    lora_A_init_method: Literal["xavier", "normal", "kaiming", "zero"] = "xavier"
    """Initialization of A (in -> dim): xavier-normal, normal(0, 0.2), kaiming-uniform or zero."""
    lora_B_init_method: Literal["xavier", "normal", "kaiming", "zero"] = "zero"
    """Initialization of B (dim -> out); zero makes the adapted model start equal to the base."""
    lora_dtype: DType | None = None
    """Dtype of the adapter weights; unset means the model's dtype."""
    sequence_parallel_input_regather: bool = unsupported("sequence parallelism", default=False)
    """Re-gather a sequence-parallel input before the adapter."""
    a2a_experimental: bool = unsupported("LoRA on mixture-of-experts layers", default=False)
    """Experimental all-to-all communication for expert adapters."""
    normalize_moe_lora: bool = unsupported("LoRA on mixture-of-experts layers", default=False)
    """Give each expert rank dim // moe_router_topk."""
    share_expert_adapters: bool = unsupported("LoRA on mixture-of-experts layers", default=True)
    """Share one adapter between all experts of a layer."""
    experts_shared_outer_loras: bool = unsupported("LoRA on mixture-of-experts layers", default=False)
    """Share the outer adapter matrices between experts."""

    def _check(self, p: Problems, bad: set[str]) -> None:
        self._check_matcher(p, bad)
        check_low_rank(self, p, bad)
