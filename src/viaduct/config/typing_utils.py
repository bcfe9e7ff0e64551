"""Small helpers to read dataclass annotations (Optional, unions, Literal, containers)."""

from __future__ import annotations

import collections.abc
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

NoneType = type(None)


def origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def is_union(tp: Any) -> bool:
    o = origin(tp)
    return o is Union or o is types.UnionType


def union_members(tp: Any) -> tuple[Any, ...]:
    return args(tp) if is_union(tp) else (tp,)


def is_optional(tp: Any) -> bool:
    return NoneType in union_members(tp)


def strip_optional(tp: Any) -> Any:
    members = [m for m in union_members(tp) if m is not NoneType]
    if len(members) == 1:
        return members[0]
    return Union[tuple(members)]


def is_literal(tp: Any) -> bool:
    return origin(tp) is Literal


def is_callable_type(tp: Any) -> bool:
    return tp is collections.abc.Callable or origin(tp) is collections.abc.Callable or tp is typing.Callable


def is_enum_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Enum)


def type_name(tp: Any) -> str:
    """A short human name for an annotation ("int", "int | None", "'a' | 'b'", "list[str]")."""
    if tp is Any:
        return "any value"
    if tp is NoneType:
        return "None"
    if is_union(tp):
        return " | ".join(type_name(m) for m in args(tp))
    if is_literal(tp):
        return " | ".join(repr(a) for a in args(tp))
    if is_callable_type(tp):
        return "function"
    o = origin(tp)
    if o is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args(tp))
        return f"{getattr(o, '__name__', str(o))}[{inner}]"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def mentions_tuple(tp: Any) -> bool:
    """Whether a tuple appears anywhere in an annotation (`tuple[list[str], ...] | None`)."""
    if origin(tp) is tuple or tp is tuple:
        return True
    return any(mentions_tuple(a) for a in args(tp) if a is not Ellipsis)


def tuples_for_lists(value: Any, tp: Any) -> Any:
    """`value` with a list turned into a tuple wherever the annotation `tp` says tuple.

    YAML and the command line have no tuples, and Python callers write `[a, b]` as often as
    `(a, b)`: both mean the annotated tuple. Returns `value` itself when nothing needed converting
    (a list the caller still holds stays that list); anything that does not fit is left for the
    type check to report.
    """
    if value is None or tp is Any:
        return value
    if is_union(tp):
        members = [m for m in args(tp) if m is not NoneType]
        # The member of the value's own container kind wins (`list[int] | tuple[int, ...]`).
        for m in members:
            if (origin(m) or m) is type(value):
                return tuples_for_lists(value, m)
        for m in members:
            if (origin(m) or m) is tuple and isinstance(value, list):
                return tuples_for_lists(value, m)
        return value
    o = origin(tp) or tp
    a = args(tp)
    if o is tuple and isinstance(value, list | tuple):
        if a and not (len(a) == 2 and a[1] is Ellipsis):
            if len(a) != len(value):
                return tuple(value)  # the type check reports the length with the field path
            items = [tuples_for_lists(v, t) for v, t in zip(value, a)]
        else:
            items = [tuples_for_lists(v, a[0] if a else Any) for v in value]
        if isinstance(value, tuple) and all(x is y for x, y in zip(items, value)):
            return value
        return tuple(items)
    if o in (list, set, frozenset) and isinstance(value, o) and a:
        items = [tuples_for_lists(v, a[0]) for v in value]
        if all(x is y for x, y in zip(items, value)):
            return value
        return o(items) if o is not list else items
    if o is dict and isinstance(value, dict) and len(a) == 2:
        converted = {k: tuples_for_lists(v, a[1]) for k, v in value.items()}
        if all(converted[k] is v for k, v in value.items()):
            return value
        return converted
    return value
