"""JSON Schema of the YAML format, for editor completion and validation of config files."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import PurePath
from typing import Any

from viaduct.config import typing_utils as tu
from viaduct.config.base import ConfigBase
from viaduct.config.docstrings import class_summary, field_docstrings
from viaduct.config.types import DType, FunctionRef, dtype_names

_TARGET_OBJECT = {
    "type": "object",
    "properties": {"_target_": {"type": "string"}, "_call_": {"type": "boolean"}},
    "required": ["_target_"],
}


def json_schema(root: type[ConfigBase]) -> dict[str, Any]:
    """A draft 2020-12 schema for `root` (and every config class reachable from it)."""
    defs: dict[str, Any] = {}
    ref = _class_schema(root, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": root.__name__,
        **ref,
        "$defs": defs,
    }


def _class_schema(cls: type[ConfigBase], defs: dict[str, Any]) -> dict[str, Any]:
    variants = cls.variants()
    if len(variants) == 1 and variants[0] is cls:
        return {"$ref": f"#/$defs/{_define(cls, defs)}"}
    return {"anyOf": [{"$ref": f"#/$defs/{_define(v, defs)}"} for v in variants]}


def _define(cls: type[ConfigBase], defs: dict[str, Any]) -> str:
    name = cls.__name__
    if name in defs:
        return name
    defs[name] = {}  # placeholder against recursion
    docs = field_docstrings(cls)
    props: dict[str, Any] = {
        "_target_": {"type": "string", "description": "class of this object", "enum": [cls.target()]}
    }
    required = []
    for fname, info in cls.spec().fields.items():
        if fname.startswith("_") or info.derived:
            continue
        s = _type_schema(info.type, defs)
        if docs.get(fname):
            s = {**s, "description": docs[fname]}
        default = info.default_value()
        if default is not dataclasses.MISSING and isinstance(default, (bool, int, float, str, type(None))):
            s = {**s, "default": default}
        props[fname] = s
        if info.required:
            required.append(fname)
    defs[name] = {
        "type": "object",
        "description": class_summary(cls),
        "properties": props,
        "additionalProperties": False,
        **({"required": required} if required else {}),
    }
    return name


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any or tp is object:
        return {}
    if tu.is_union(tp):
        return {"anyOf": [_type_schema(m, defs) for m in tu.union_members(tp)]}
    if tp is tu.NoneType:
        return {"type": "null"}
    if tu.is_literal(tp):
        return {"enum": list(tu.args(tp))}
    if tp is DType:
        return {"anyOf": [{"type": "string", "examples": dtype_names()}, _TARGET_OBJECT]}
    if tp is FunctionRef or tu.is_callable_type(tp):
        return {"anyOf": [{"type": "string"}, _TARGET_OBJECT]}
    o = tu.origin(tp)
    if o in (list, set, frozenset, tuple):
        a = tu.args(tp)
        if o is tuple and a and not (len(a) == 2 and a[1] is Ellipsis):
            return {
                "type": "array",
                "prefixItems": [_type_schema(t, defs) for t in a],
                "minItems": len(a),
                "maxItems": len(a),
            }
        return {"type": "array", "items": _type_schema(a[0], defs) if a else {}}
    if o is dict:
        a = tu.args(tp)
        return {"type": "object", "additionalProperties": _type_schema(a[1], defs) if len(a) == 2 else {}}
    if isinstance(tp, type):
        if issubclass(tp, ConfigBase):
            return _class_schema(tp, defs)
        if issubclass(tp, Enum):
            return {"anyOf": [{"enum": [m.name for m in tp]}, _TARGET_OBJECT]}
        if tp is bool:
            return {"type": "boolean"}
        if tp is int:
            return {"type": "integer"}
        if tp is float:
            return {"type": "number"}
        if tp is str or issubclass(tp, PurePath):
            return {"type": "string"}
    return {}
