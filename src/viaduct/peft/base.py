"""`PEFT`: the base of parameter-efficient fine-tuning configs, and `ModuleMatcher`.

Only the configuration lives here; applying adapters to a model (freezing the base weights,
wrapping the matched linear layers, saving only adapter weights) comes with the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from viaduct.config import ConfigBase, Problems, fields_with_problems


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
