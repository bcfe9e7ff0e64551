"""Mixed-precision recipes (`cfg.mixed_precision`) and how they are applied.

A `MixedPrecisionConfig` holds precision settings that belong on several components at once: the
model (`bf16`, `params_dtype`, ...), the optimizer (`bf16`, loss scaling) and DDP
(`grad_reduce_in_fp32`). `apply_mixed_precision()` copies them there; the recipe wins over values
set directly on those components (as in Megatron Bridge), and each value it replaces that the user
had set is reported, so nothing is overridden silently.

Two deliberate differences from Bridge:

* A `None` in the recipe means "leave the target as it is" and is not copied (Bridge copies None
  too, so `bf16_mixed` wiped a user's `autocast_dtype`).
* `autocast_enabled` lands on `model.enable_autocast` (in Bridge it matched no field and did nothing).
* FP8 / FP4 knobs (`fp8_recipe`, `fp8_margin`, ..., `first_last_layers_bf16`) are copied only when
  the recipe turns FP8 / FP4 on, so `bf16_mixed` does not rewrite inert settings everywhere.

`fp8_param` and `fp8_param_gather` are not kept equal on assignment as in Bridge; `finalize()`
derives an unset `fp8_param` from `fp8_param_gather` (FP8 is not supported yet anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from viaduct.config import ConfigBase, ConfigError, DType, Problem, Problems, unsupported
from viaduct.config.base import FieldInfo
from viaduct.config.errors import did_you_mean, fields_with_problems
from viaduct.config.provenance import is_user_set


@dataclass(kw_only=True)
class MixedPrecisionConfig(ConfigBase):
    """Precision settings applied to the model, optimizer and DDP configs (a recipe such as bf16_mixed)."""

    _recipe_name_: ClassVar[str | None] = None
    """Name of the recipe this object was made from (set per instance by get_mixed_precision_config)."""

    fp32: bool = False
    """Train in full float32 (documents the intent; bf16 and fp16 must then be off)."""
    fp16: bool = False
    """Train in float16 with loss scaling."""
    bf16: bool = False
    """Train in bfloat16."""
    params_dtype: DType | None = None
    """Dtype of the model weights; unset leaves the model's value."""
    pipeline_dtype: DType | None = None
    """Dtype of activations sent between pipeline stages; unset leaves the model's value."""
    autocast_dtype: DType | None = None
    """Dtype of autocast regions; unset leaves the model's value."""
    autocast_enabled: bool = False
    """Run the forward pass under torch.autocast (copied to model.enable_autocast)."""
    grad_reduce_in_fp32: bool = True
    """Reduce gradients across data-parallel ranks in float32 (copied to ddp)."""
    fp8: Literal["e4m3", "hybrid"] | None = unsupported("FP8 training", default=None)
    """FP8 format: e4m3, or hybrid (e4m3 forward, e5m2 gradients)."""
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise", "custom"] = "tensorwise"
    """FP8 scaling recipe (only with fp8)."""
    first_last_layers_bf16: bool = False
    """Keep the first and last layers in bf16 when training in FP8/FP4."""
    fp8_margin: int = 0
    """Margin of the FP8 scaling factor (only with fp8)."""
    fp8_amax_history_len: int = 1
    """Length of the amax history window (only with fp8)."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """How the amax is picked from its history (only with fp8)."""
    fp8_wgrad: bool = True
    """Compute weight gradients in FP8 (only with fp8)."""
    fp8_dot_product_attention: bool = False
    """Run dot-product attention in FP8 (only with fp8)."""
    fp8_multi_head_attention: bool = False
    """Run the whole multi-head attention in FP8 (only with fp8)."""
    fp8_param: bool | None = unsupported("FP8 training", default=None)
    """Keep the weights in FP8; unset means fp8_param_gather."""
    fp8_param_gather: bool = unsupported("FP8 training", default=False)
    """Gather FP8 weights across data-parallel ranks (distributed optimizer)."""
    fp4: Literal["e2m1"] | None = unsupported("FP4 training", default=None)
    """FP4 format."""
    fp4_recipe: Literal["nvfp4", "custom"] = "nvfp4"
    """FP4 scaling recipe (only with fp4)."""
    fp4_param: bool | None = unsupported("FP4 training", default=None)
    """Keep the weights in FP4; unset means fp4_param_gather."""
    fp4_param_gather: bool = unsupported("FP4 training", default=False)
    """Gather FP4 weights across data-parallel ranks."""
    loss_scale: float | None = None
    """Static loss scale for fp16; unset means dynamic loss scaling."""
    initial_loss_scale: float | None = 2.0**32
    """Starting dynamic loss scale (fp16)."""
    min_loss_scale: float = 1.0
    """Smallest dynamic loss scale (fp16)."""
    loss_scale_window: float = 1000.0
    """Steps without overflow before the dynamic loss scale grows (fp16)."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic loss scale shrinks (fp16)."""
    num_layers_at_start_in_bf16: int = 0
    """Layers at the start kept in bf16 (with first_last_layers_bf16)."""
    num_layers_at_end_in_bf16: int = 0
    """Layers at the end kept in bf16 (with first_last_layers_bf16)."""
    reuse_grad_buf_for_mxfp8_param_ag: bool = False
    """Reuse the gradient buffer for the MXFP8 weight all-gather (only with fp8)."""

    @classmethod
    def from_string(cls, name: str) -> MixedPrecisionConfig:
        """The named recipe (`mixed_precision=bf16_mixed`, hyphens accepted: `bf16-mixed`)."""
        from viaduct.config.codec import CoerceError

        try:
            return get_mixed_precision_config(name)
        except ConfigError as exc:
            problem = exc.problems[0]
            raise CoerceError(problem.message, fix=problem.fix) from None

    def finalize(self) -> None:
        """Derive fp8_param / fp4_param from their *_param_gather twins; check every rule at once."""
        p = Problems()
        p.extend(self.check_types())
        bad = fields_with_problems(p.items)
        # After check_types(): these are unsupported fields, already reported through their twins.
        if self.fp8_param is None and self.fp8_param_gather is True:
            self.derive("fp8_param", True, "= fp8_param_gather")
        if self.fp4_param is None and self.fp4_param_gather is True:
            self.derive("fp4_param", True, "= fp4_param_gather")
        if self.fp16 and self.bf16:
            p.add(
                "bf16",
                "fp16 and bf16 cannot both be true",
                True,
                fix="set mixed_precision.fp16 or mixed_precision.bf16 to false",
            )
        if self.fp32 and (self.fp16 or self.bf16):
            p.add(
                "fp32",
                "contradicts " + ("fp16" if self.fp16 else "bf16") + "=true",
                True,
                fix="set mixed_precision.fp32=false, or turn fp16/bf16 off",
            )
        if "params_dtype" not in bad and self.params_dtype is not None:
            want = "float16" if self.fp16 else "bfloat16" if self.bf16 else "float32" if self.fp32 else None
            if want is not None and self.params_dtype != DType(want):
                p.add(
                    "params_dtype",
                    f"contradicts the precision mode ({want})",
                    self.params_dtype,
                    fix=f"set mixed_precision.params_dtype={want} or leave it unset",
                )
        if self.fp8 is not None and self.fp4 is not None:
            p.add("fp4", "fp4 and fp8 cannot both be set", self.fp4, fix="unset mixed_precision.fp4 or .fp8")
        if (
            self.fp8_param_gather is True
            and self.fp8_recipe == "mxfp8"
            and not self.reuse_grad_buf_for_mxfp8_param_ag
        ):
            p.add(
                "reuse_grad_buf_for_mxfp8_param_ag",
                "must be true with fp8_param_gather and fp8_recipe mxfp8",
                False,
                fix="set mixed_precision.reuse_grad_buf_for_mxfp8_param_ag=true",
            )
        for name in ("loss_scale", "initial_loss_scale"):
            value = getattr(self, name)
            if name not in bad and value is not None and value <= 0:
                p.add(name, "must be > 0 when set", value, fix=f"set mixed_precision.{name} > 0 or unset it")
        for name, low in (("min_loss_scale", 0), ("loss_scale_window", 0), ("fp8_amax_history_len", 0)):
            value = getattr(self, name)
            if name not in bad and value <= low:
                p.add(name, f"must be > {low}", value, fix=f"set mixed_precision.{name} to a positive value")
        for name, low in (
            ("hysteresis", 1),
            ("num_layers_at_start_in_bf16", 0),
            ("num_layers_at_end_in_bf16", 0),
        ):
            value = getattr(self, name)
            if name not in bad and value < low:
                p.add(name, f"must be >= {low}", value, fix=f"set mixed_precision.{name} >= {low}")
        p.raise_if_any()


# ----------------------------------------------------------------------------------------------
# recipes

MIXED_PRECISION_RECIPES: dict[str, Callable[[], MixedPrecisionConfig]] = {}
"""Recipe name (underscores) -> function returning a fresh `MixedPrecisionConfig`."""


def register_mixed_precision_recipe(
    fn: Callable[[], MixedPrecisionConfig] | None = None, *, name: str | None = None
) -> Any:
    """Register a recipe under its function name (or `name`); usable as a decorator."""

    def add(f: Callable[[], MixedPrecisionConfig]) -> Callable[[], MixedPrecisionConfig]:
        MIXED_PRECISION_RECIPES[_normalize(name or f.__name__)] = f
        return f

    return add(fn) if fn is not None else add


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get_mixed_precision_config(name: str | MixedPrecisionConfig) -> MixedPrecisionConfig:
    """A fresh object of the named recipe (hyphens or underscores); an object is returned as is.

    Unknown names raise `ConfigError` (a `ValueError`) listing the valid names.
    """
    if isinstance(name, MixedPrecisionConfig):
        return name
    key = _normalize(str(name))
    factory = MIXED_PRECISION_RECIPES.get(key)
    if factory is None:
        names = sorted(MIXED_PRECISION_RECIPES)
        hint = did_you_mean(key, names)
        raise ConfigError(
            Problem(
                "",
                f"unknown mixed-precision recipe {name!r}",
                fix=(hint + " " if hint else "") + f"valid recipes: {', '.join(names)}",
            )
        )
    mp = factory()
    object.__setattr__(mp, "_recipe_name_", key)
    return mp


def _with(base: Callable[[], MixedPrecisionConfig], **changes: Any) -> MixedPrecisionConfig:
    mp = base()
    for k, v in changes.items():
        setattr(mp, k, v)
    return mp


@register_mixed_precision_recipe
def bf16_mixed() -> MixedPrecisionConfig:
    """bf16 weights and compute, gradients reduced in fp32."""
    return MixedPrecisionConfig(
        bf16=True, params_dtype=DType("bfloat16"), pipeline_dtype=DType("bfloat16"), grad_reduce_in_fp32=True
    )


@register_mixed_precision_recipe
def fp16_mixed() -> MixedPrecisionConfig:
    """fp16 weights and compute with dynamic loss scaling, gradients reduced in fp16."""
    return MixedPrecisionConfig(
        fp16=True, params_dtype=DType("float16"), pipeline_dtype=DType("float16"), grad_reduce_in_fp32=False
    )


@register_mixed_precision_recipe
def fp32() -> MixedPrecisionConfig:
    """Full float32 (no Bridge equivalent: Bridge leaves mixed_precision unset for fp32)."""
    return MixedPrecisionConfig(
        fp32=True, params_dtype=DType("float32"), pipeline_dtype=DType("float32"), grad_reduce_in_fp32=True
    )


register_mixed_precision_recipe(fp32, name="fp32_mixed")

# FP8 / FP4 recipes: registered so Megatron Bridge names resolve, but FP8/FP4 are not supported yet,
# so validating a config that uses one reports "FP8 training is not supported yet".
_FP8_DELAYED = dict(
    fp8="hybrid",
    fp8_recipe="delayed",
    fp8_margin=0,
    fp8_amax_history_len=1024,
    fp8_amax_compute_algo="max",
    fp8_param_gather=True,
)
_FP8_CURRENT = dict(
    fp8="hybrid",
    fp8_recipe="tensorwise",
    first_last_layers_bf16=True,
    num_layers_at_start_in_bf16=1,
    num_layers_at_end_in_bf16=1,
    fp8_param_gather=True,
)
_FP8_SUBCHANNEL = dict(fp8="hybrid", fp8_recipe="blockwise", fp8_param_gather=False)
_MXFP8 = dict(fp8="e4m3", fp8_recipe="mxfp8", fp8_param_gather=True, reuse_grad_buf_for_mxfp8_param_ag=True)
_FP8_RECIPES: dict[str, tuple[Callable[[], MixedPrecisionConfig], dict[str, Any]]] = {
    "bf16_with_fp8_delayed_scaling_mixed": (bf16_mixed, _FP8_DELAYED),
    "fp16_with_fp8_delayed_scaling_mixed": (fp16_mixed, _FP8_DELAYED),
    "bf16_with_fp8_current_scaling_mixed": (bf16_mixed, _FP8_CURRENT),
    "fp16_with_fp8_current_scaling_mixed": (fp16_mixed, _FP8_CURRENT),
    "nemotron_h_bf16_with_fp8_current_scaling_mixed": (
        bf16_mixed,
        {**_FP8_CURRENT, "num_layers_at_start_in_bf16": 2, "num_layers_at_end_in_bf16": 2},
    ),
    "nanov2_bf16_with_fp8_current_scaling_mixed": (
        bf16_mixed,
        {
            **_FP8_CURRENT,
            "fp8_recipe": "blockwise",
            "num_layers_at_start_in_bf16": 2,
            "num_layers_at_end_in_bf16": 2,
        },
    ),
    "bf16_with_fp8_subchannel_scaling_mixed": (bf16_mixed, _FP8_SUBCHANNEL),
    "fp16_with_fp8_subchannel_scaling_mixed": (fp16_mixed, _FP8_SUBCHANNEL),
    "bf16_with_mxfp8_mixed": (bf16_mixed, _MXFP8),
    "fp16_with_mxfp8_mixed": (fp16_mixed, _MXFP8),
    "bf16_with_nvfp4_mixed": (bf16_mixed, dict(fp4="e2m1", fp4_recipe="nvfp4", fp4_param_gather=True)),
    "nemotron_3_super_bf16_with_nvfp4_mixed": (
        bf16_mixed,
        dict(
            fp4="e2m1",
            fp4_recipe="nvfp4",
            fp4_param_gather=True,
            first_last_layers_bf16=True,
            num_layers_at_start_in_bf16=0,
            num_layers_at_end_in_bf16=14,
        ),
    ),
}
for _name, (_base, _changes) in _FP8_RECIPES.items():
    register_mixed_precision_recipe(functools.partial(_with, _base, **_changes), name=_name)


# ----------------------------------------------------------------------------------------------
# applying a recipe

# Recipe fields that land on a differently named target field.
_RENAMED = {"autocast_enabled": "enable_autocast"}
# Knobs of FP8 / FP4 training, copied only when the recipe turns that format on.
_LOW_PRECISION_LAYERS = {"first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"}


def _inert(mp: MixedPrecisionConfig, name: str) -> bool:
    """Whether `name` is a knob of a format (FP8 / FP4) that `mp` leaves off."""
    if name in _LOW_PRECISION_LAYERS:
        return mp.fp8 is None and mp.fp4 is None
    if name.startswith("fp8_") or name == "reuse_grad_buf_for_mxfp8_param_ag":
        return mp.fp8 is None
    return name.startswith("fp4_") and mp.fp4 is None


def _restates_default(info: FieldInfo, value: object, source: str | None) -> bool:
    """A YAML value equal to the field's default: a full dump (`viaduct config show`) repeats every
    default, and warning that the recipe overrides those would bury the warnings that matter."""
    return source is not None and source.startswith("file ") and value == info.default_value()


def apply_mixed_precision(
    mp: MixedPrecisionConfig,
    model: ConfigBase,
    optimizer: ConfigBase | None = None,
    ddp: ConfigBase | None = None,
    *,
    label: str | None = None,
) -> list[str]:
    """Copy the recipe's settings onto model / optimizer / ddp; return notes on user values it replaced.

    Every non-None field of `mp` is written to each target that has a field of the same name
    (`autocast_enabled` -> `enable_autocast`) when the value differs; FP8 / FP4 knobs only when the
    recipe turns that format on. Writes go through `derive`,
    so they are marked "derived (mixed_precision <label>)" and `validate()` recomputes them from
    scratch next time. A note is returned for each value the user had set explicitly.
    """
    label = label or mp._recipe_name_ or "object"
    notes: list[str] = []
    spec = type(mp).spec()
    names = [n for n in spec.public_names() if not spec.fields[n].derived and not _inert(mp, n)]
    for target_name, target in (("model", model), ("optimizer", optimizer), ("ddp", ddp)):
        if target is None:
            continue
        fields = type(target).spec().fields
        for name in names:
            value = getattr(mp, name)
            dest = _RENAMED.get(name, name)
            info = fields.get(dest)
            if value is None or info is None or info.derived or dest.startswith("_"):
                continue
            old = getattr(target, dest)
            if old == value:
                continue
            source = target.source_of(dest)
            if is_user_set(source) and not _restates_default(info, old, source):
                notes.append(
                    f"{target_name}.{dest}={old!r} (from {source}) is overridden by mixed_precision "
                    f"{label}: {value!r}; set mixed_precision.{name} to change it"
                )
            target.derive(dest, value, f"mixed_precision {label}")
    return notes
