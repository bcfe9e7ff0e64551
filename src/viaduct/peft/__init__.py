"""Parameter-efficient fine-tuning configs: `viaduct.peft.LoRA`, `viaduct.peft.DoRA`."""

from viaduct.peft.base import PEFT, ModuleMatcher
from viaduct.peft.dora import DoRA
from viaduct.peft.lora import LoRA

__all__ = ["PEFT", "DoRA", "LoRA", "ModuleMatcher"]
