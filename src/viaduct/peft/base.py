"""`PEFT`: the base of parameter-efficient fine-tuning configs, and `ModuleMatcher`.

A PEFT object is also the transform: `model = peft(model)` freezes the base weights and puts an
adapter on each matched linear layer; `merge`, `adapter_state_dict`, `load_adapter_state_dict` and
`save_hf_adapter` work on the adapted model. The model-side code lives in `viaduct.peft.transform`
and `viaduct.peft.adapters`, imported on first use so that reading a config never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from viaduct.config import ConfigBase, Problems, fields_with_problems

if TYPE_CHECKING:
    import torch
    from torch import nn

    from viaduct.peft.dora import DoRA
    from viaduct.peft.lora import LoRA

ModelT = TypeVar("ModelT", bound="nn.Module | list[nn.Module]")


@dataclass(kw_only=True)
class PEFT(ConfigBase):
    """A parameter-efficient fine-tuning method (LoRA, DoRA): which modules it adapts and how."""

    _abstract_config_ = True

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "params_to_save": "runtime bookkeeping of the trained parameters, never configuration",
    }

    def finalize(self) -> None:
        """Check every rule of this method; raise `ConfigError` with all problems at once."""
        p = Problems()
        p.extend(self.check_types())
        self._check(p, fields_with_problems(p.items))
        p.raise_if_any()

    def _check(self, p: Problems, bad: set[str]) -> None:
        """Add this method's problems to `p` (fields in `bad` already have a type problem)."""

    # ------------------------------------------------------------------ the model transform

    def _low_rank(self) -> LoRA | DoRA:
        from viaduct.peft.dora import DoRA
        from viaduct.peft.lora import LoRA

        if not isinstance(self, (LoRA, DoRA)):
            raise TypeError(f"{type(self).__name__} has no model transform (LoRA and DoRA do)")
        return self

    def __call__(self, model: ModelT, training: bool = True, *, init_seed: int | None = None) -> ModelT:
        """Adapt `model` in place and return it (Megatron Bridge's `PEFT.__call__`): finalize this
        config, freeze every parameter, put an adapter on each matched linear layer. With `training`
        the adapters are trainable and the model is in train mode; otherwise they are frozen as well
        and the model is in eval mode. A list is taken as the chunks of one model. Applying to a
        model that already has adapters is an error."""
        from viaduct.peft.transform import apply

        apply(self._low_rank(), model, training, init_seed)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight and remove the adapters (in place); returns the
        plain model, whose base parameters keep their names and objects."""
        from viaduct.peft.transform import merge

        return merge(model)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only the adapter tensors of `model`, by parameter name
        (`decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight`)."""
        from viaduct.peft.transform import adapter_state_dict

        return adapter_state_dict(model)

    def load_adapter_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` (from `adapter_state_dict`) into the model's adapters; raises `ConfigError`
        naming every missing, unexpected or wrongly shaped tensor, copying nothing then."""
        from viaduct.peft.transform import load_adapter_state_dict

        load_adapter_state_dict(model, state)

    def save_hf_adapter(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        base_model_name_or_path: str | None = None,
    ) -> None:
        """Write the adapters as a Hugging Face PEFT adapter directory (`adapter_config.json`,
        `adapter_model.safetensors`) for the Hugging Face model of the same base (Llama family)."""
        from viaduct.peft.transform import save_hf_adapter

        save_hf_adapter(self._low_rank(), model, path, base_model_name_or_path)


@dataclass(kw_only=True)
class ModuleMatcher(ConfigBase):
    """Picks the modules a PEFT method adapts, by name (mixed into LoRA and DoRA)."""

    _abstract_config_ = True

    target_modules: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    """Modules to adapt: bare names ("linear_qkv") or full-name wildcards ("*.layers.0.*.linear_fc1")."""
    exclude_modules: list[str] = field(default_factory=list)
    """Adapt every linear layer except these (needs an empty target_modules)."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "canonical_mapping": "runtime bookkeeping of matched module names"
    }

    def _check_matcher(self, p: Problems, bad: set[str]) -> None:
        if bad.intersection({"target_modules", "exclude_modules"}):
            return
        if self.exclude_modules and self.target_modules:
            p.add(
                "exclude_modules",
                "needs an empty target_modules (use one or the other)",
                self.exclude_modules,
                fix="set peft.target_modules=[] to adapt everything except exclude_modules",
            )
        elif not self.exclude_modules and not self.target_modules:
            p.add(
                "target_modules",
                "is empty, so nothing would be adapted",
                [],
                fix="list module names in peft.target_modules (e.g. [linear_qkv, linear_proj])",
            )
        for name in ("target_modules", "exclude_modules"):
            empty = [i for i, m in enumerate(getattr(self, name)) if not m.strip()]
            if empty:
                p.add(
                    f"{name}[{empty[0]}]",
                    "must be a module name, not empty",
                    "",
                    fix=f"remove the empty entry from peft.{name}",
                )


class LowRankFields(Protocol):
    """The low-rank adapter fields LoRA and DoRA share (each declares them with its own defaults)."""

    dim: int
    alpha: float
    dropout: float


def check_low_rank(obj: LowRankFields, p: Problems, bad: set[str]) -> None:
    """Rules shared by LoRA and DoRA: dim > 0, alpha > 0, 0 <= dropout < 1."""
    if "dim" not in bad and obj.dim <= 0:
        p.add("dim", "must be > 0", obj.dim, fix="set peft.dim to the adapter rank, e.g. 32")
    if "alpha" not in bad and obj.alpha <= 0:
        p.add("alpha", "must be > 0", obj.alpha, fix="set peft.alpha (the update is scaled by alpha / dim)")
    if "dropout" not in bad and not 0.0 <= obj.dropout < 1.0:
        p.add("dropout", "must be in [0, 1)", obj.dropout, fix="set peft.dropout to a probability, e.g. 0.0")
