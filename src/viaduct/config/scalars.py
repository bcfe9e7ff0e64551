"""Leaf values of a config: `CoerceError`, and one YAML or CLI value turned into a bool, an int, a
float, a `Literal` choice, an enum member or a dtype.

Numbers come from strings ("1e-4", "1_000", "inf"), booleans from "true"/"no"/"on", literals and
enums by name in any case, dtypes by alias. `viaduct.config.codec` dispatches to these by annotation.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from viaduct.config import typing_utils as tu
from viaduct.config.errors import did_you_mean
from viaduct.config.types import DType, dtype_names


class CoerceError(ValueError):
    """A value that does not fit its annotation: `message` says why, `fix` what would fit."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def describe(value: Any) -> str:
    """The type and (shortened) repr of a value, for messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}


def coerce_literal(value: Any, tp: Any) -> Any:
    choices = tu.args(tp)
    if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
        for c in choices:  # return the declared object (keeps "1" vs 1 straight)
            if c == value and type(c) is type(value):
                return c
    if isinstance(value, str):
        for c in choices:
            if isinstance(c, str) and c.lower() == value.lower():
                return c
            if (
                isinstance(c, int)
                and not isinstance(c, bool)
                and value.strip().lstrip("-").isdigit()
                and int(value) == c
            ):
                return c
    str_choices = [str(c) for c in choices]
    hint = did_you_mean(str(value), str_choices)
    raise CoerceError(
        f"must be one of {', '.join(repr(c) for c in choices)}",
        fix=hint or f"use one of {', '.join(str_choices)}",
    )


def coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise CoerceError(f"expected true or false, got {describe(value)}")


def coerce_int(value: Any) -> int:
    if isinstance(value, bool):
        raise CoerceError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
    raise CoerceError(f"expected an integer, got {describe(value)}")


def coerce_float(value: Any) -> float:
    if isinstance(value, bool):
        raise CoerceError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "+inf", ".inf", "infinity"):
            return math.inf
        if text in ("-inf", "-.inf"):
            return -math.inf
        try:
            return float(text.replace("_", ""))
        except ValueError:
            pass
    raise CoerceError(f"expected a number, got {describe(value)}")


def coerce_dtype(value: Any) -> DType:
    if isinstance(value, dict) and "_target_" in value:
        value = value["_target_"]
    name = DType.canonical_name(value)
    if name is None:
        raise CoerceError(f"{value!r} is not a dtype", fix=f"use one of {', '.join(dtype_names())}")
    return DType(name)


def coerce_enum(value: Any, tp: type[Enum]) -> Enum:
    if isinstance(value, tp):
        return value
    if isinstance(value, dict) and "_target_" in value:
        args = value.get("_args_") or []
        if args:
            value = args[0]
        elif "_name_" in value:
            value = value["_name_"]
    if isinstance(value, str):
        for member in tp:
            if member.name.lower() == value.strip().lower():
                return member
    try:
        return tp(value)
    except (ValueError, TypeError):
        pass
    names = [m.name for m in tp]
    hint = did_you_mean(str(value), names)
    raise CoerceError(f"{value!r} is not a {tp.__name__}", fix=hint or f"use one of {', '.join(names)}")
