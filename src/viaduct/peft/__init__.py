"""Parameter-efficient fine-tuning: `viaduct.peft.LoRA`, `viaduct.peft.DoRA` (configs that are also
the model transform: `model = LoRA()(model)`; see docs/peft.md)."""

from viaduct.peft.base import PEFT, ModuleMatcher
from viaduct.peft.dora import DoRA
from viaduct.peft.lora import LoRA

__all__ = ["PEFT", "DoRA", "LoRA", "ModuleMatcher"]
