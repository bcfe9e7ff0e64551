"""Field-level differences between two configurations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from viaduct.config.base import ConfigBase


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> leaf value of `to_dict()` output; dtype/function/enum mappings stay whole."""
    if isinstance(data, dict) and not ("_call_" in data or "_partial_" in data):
        out: dict[str, Any] = {}
        for k, v in data.items():
            if k == "_target_" and prefix:
                out[f"{prefix}._target_"] = v
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not data and prefix:
            out[prefix] = {}
        return out
    return {prefix: data}


@dataclass(frozen=True)
class Change:
    path: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.before)} -> {_show(self.after)}"


_ABSENT = "<absent>"


def _show(value: Any) -> str:
    if isinstance(value, dict) and "_target_" in value:
        target = value["_target_"]
        if "_name_" in value:
            return f"{target.rsplit('.', 1)[-1]}.{value['_name_']}"
        return target
    return repr(value) if value != _ABSENT else _ABSENT


def diff(a: ConfigBase | dict[str, Any], b: ConfigBase | dict[str, Any]) -> list[Change]:
    """Every leaf that differs between `a` and `b`, in `a`'s field order (then `b`'s new ones)."""
    fa = flatten(a.to_dict() if isinstance(a, ConfigBase) else a)
    fb = flatten(b.to_dict() if isinstance(b, ConfigBase) else b)
    changes = [Change(k, v, fb.get(k, _ABSENT)) for k, v in fa.items() if fb.get(k, _ABSENT) != v]
    changes += [Change(k, _ABSENT, v) for k, v in fb.items() if k not in fa]
    return changes


def non_default_values(cfg: ConfigBase) -> dict[str, Any]:
    """Dotted path -> value of every field that differs from its class default."""
    out: dict[str, Any] = {}
    for path, obj in cfg.walk():
        default = None
        for name, info in type(obj).spec().fields.items():
            if name.startswith("_") or info.derived:
                continue
            value = obj.__dict__.get(name)
            if isinstance(value, ConfigBase):
                continue
            if info.required:
                default = object()
            else:
                default = info.default_value()
            if value != default:
                out[f"{path}.{name}" if path else name] = value
    return out
