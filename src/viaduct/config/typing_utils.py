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
