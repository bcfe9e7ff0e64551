"""Checking a value against its field's annotation, without converting it.

`ConfigBase.check_types()` runs `check_type` over the values set from Python; the codec runs
`check_coerced` on every decoded field, so that a value of the right type that is still not allowed
(NaN, a function off the allowlist) is reported at the file line or override that gave it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from viaduct.config import typing_utils as tu
from viaduct.config.errors import did_you_mean
from viaduct.config.scalars import CoerceError, describe
from viaduct.config.targets import function_problem
from viaduct.config.types import DType, FunctionRef


def check_type(value: Any, tp: Any, *, allow_inf: bool = False) -> str | None:
    """Why `value` does not fit annotation `tp`, or None when it does (no conversion).

    A float must be finite (`allow_inf`: infinity is fine, NaN never is); a function named by a
    `FunctionRef` must be on the function allowlist.
    """
    if tp is Any or tp is object:
        return None
    if tu.is_union(tp):
        members = [m for m in tu.union_members(tp) if m is not tu.NoneType or value is None]
        reasons = [check_type(value, m, allow_inf=allow_inf) for m in members]
        if any(r is None for r in reasons):
            return None
        fitting = [r for r in reasons if r is not None and r.startswith((_NOT_FINITE, _NOT_NAN))]
        if fitting:  # a float of a `float | None` field: say what is wrong with it, not the union
            return fitting[0]
        return reasons[0] if len(reasons) == 1 else f"expected {tu.type_name(tp)}, got {describe(value)}"
    if value is None:
        return None if tp is tu.NoneType else f"must not be None (expected {tu.type_name(tp)})"
    if tu.is_literal(tp):
        choices = tu.args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return None
        hint = did_you_mean(str(value), [str(c) for c in choices])
        return f"must be one of {', '.join(repr(c) for c in choices)}" + (f"; {hint}" if hint else "")
    if tp is DType:
        if isinstance(value, DType) or (not isinstance(value, str) and DType.canonical_name(value)):
            return None
        return f"expected a dtype, got {describe(value)}"
    if tp is FunctionRef or tu.is_callable_type(tp):
        return _function_problem(value)
    o = tu.origin(tp)
    if o is not None:
        if o in (list, tuple, set, frozenset, dict) and not isinstance(value, o):
            return f"expected {tu.type_name(tp)}, got {describe(value)}"
        a = tu.args(tp)
        if o is dict and len(a) == 2:
            for k, v in value.items():
                r = check_type(k, a[0]) or check_type(v, a[1], allow_inf=allow_inf)
                if r:
                    return f"[{k!r}]: {r}"
        elif o is tuple and a and not (len(a) == 2 and a[1] is Ellipsis):
            if len(value) != len(a):
                return f"expected {len(a)} items, got {len(value)}"
            for i, (v, t) in enumerate(zip(value, a)):
                r = check_type(v, t, allow_inf=allow_inf)
                if r:
                    return f"[{i}]: {r}"
        elif a:
            for i, v in enumerate(value):
                r = check_type(v, a[0], allow_inf=allow_inf)
                if r:
                    return f"[{i}]: {r}"
        return None
    if isinstance(tp, type):
        if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                if not allow_inf:
                    return f"{_NOT_FINITE}, not NaN or infinity"
                if math.isnan(value):
                    return f"{_NOT_NAN} (infinity is allowed here)"
            return None
        if tp is int and isinstance(value, bool):
            return f"expected an integer, got {value!r}"
        if isinstance(value, tp):
            return None
        return f"expected {tu.type_name(tp)}, got {describe(value)}"
    return None


# NaN and infinity pass every `<` / `>` range check of `finalize()` and only fail mid-run (or never:
# a NaN clipping threshold silently disables clipping), so the type check refuses them.
_NOT_FINITE = "must be a finite number"


_NOT_NAN = "must be a number, not NaN"


def _function_problem(value: Any) -> str | None:
    if isinstance(value, functools.partial):
        return _function_problem(value.func)
    if isinstance(value, FunctionRef):
        return function_problem(value.path)
    # A function object set from Python: the caller's code, trusted like any other code it runs.
    return None if callable(value) else f"expected a function, got {describe(value)}"


def check_coerced(value: Any, tp: Any, *, allow_inf: bool = False) -> None:
    """Raise `CoerceError` for a coerced field value that is of the right type but not allowed
    (a non-finite float, a function off the allowlist): loading reports it at the file line or
    override that gave it, not later in `validate()`."""
    reason = check_type(value, tp, allow_inf=allow_inf)
    if reason is not None:
        raise CoerceError(reason)
