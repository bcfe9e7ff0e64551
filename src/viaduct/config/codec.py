"""The `_target_` codec: config values <-> plain YAML-able data, driven by the field annotations.

Encoding follows Megatron Bridge's YAML format: every config object is a mapping
with `_target_`; a dtype is `{_target_: torch.bfloat16, _call_: false}`; a function
`{_target_: path, _call_: false}`; an enum `{_target_: Enum, _call_: true, _args_: [value]}`; a
partial `{_target_: f, _partial_: true, _args_: [...], kw: ...}`. Where the annotation already says
tuple or Path the value is written plainly and restored from the annotation; elsewhere tuples and
Paths carry a `_target_` so that nothing is lost.

Decoding (`coerce`) turns YAML data, dicts and CLI strings into the annotated type: numbers from
strings ("1e-4"), booleans from "true"/"no", enums by name, dtypes by alias (those leaf values in
`viaduct.config.scalars`), functions by name, sub-configs from mappings (with or without
`_target_`) or by short name ("lora"). Each decoded field is then checked like a value set from
Python (`viaduct.config.typecheck`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from viaduct.config import typing_utils as tu
from viaduct.config.errors import MAX_LISTED, Problem, did_you_mean
from viaduct.config.interpolation import has_interpolation
from viaduct.config.scalars import (
    CoerceError,
    coerce_bool,
    coerce_dtype,
    coerce_enum,
    coerce_float,
    coerce_int,
    coerce_literal,
    describe,
)
from viaduct.config.targets import TargetError, config_class_for, is_allowed_function, resolve_target
from viaduct.config.typecheck import check_coerced
from viaduct.config.typecheck import check_type as check_type  # re-exported: ConfigBase imports it here
from viaduct.config.types import DType, FunctionRef, Partial, function_path

if TYPE_CHECKING:
    from viaduct.config.base import ConfigBase, FieldInfo

SPECIAL_KEYS = ("_target_", "_call_", "_args_", "_partial_", "_name_")


@dataclasses.dataclass
class DecodeContext:
    """State shared while decoding one document: strictness, problems found, where values came from."""

    strict: bool = True
    problems: list[Problem] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    source: str = "dict"
    lines: dict[str, int] | None = None
    """Dotted path -> line number in `source` (a YAML file), for messages and provenance."""
    defer: bool = True
    """Leave `${...}` values as they are and note them in `interpolations`: they are resolved once
    every source is merged (`viaduct.config.interpolation`). Off while resolving them."""
    interpolations: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    """(dotted path, value as written) of every value left for interpolation."""

    def hint(self, name: str, candidates: Iterable[str]) -> str:
        """`did_you_mean`, for the problems a message lists: half a million unknown keys must not
        cost a fuzzy match each (the message shows the first `MAX_LISTED`)."""
        return did_you_mean(name, candidates) if len(self.problems) < MAX_LISTED else ""

    def source_for(self, path: str) -> str:
        if self.lines is not None:
            line = self.lines.get(path)
            if line is not None:
                return f"{self.source}:{line}"
        return self.source

    def problem(
        self,
        path: str,
        message: str,
        value: Any = Problem.__dataclass_fields__["value"].default,
        fix: str | None = None,
    ) -> None:
        self.problems.append(Problem(path, message, value, fix, self.source_for(path)))


# ----------------------------------------------------------------------------------------------
# encoding


def encode(value: Any, tp: Any = Any) -> Any:
    """A config value as plain YAML-able data (see the module docstring)."""
    from viaduct.config.base import ConfigBase

    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, DType):
        return {"_target_": value.target, "_call_": False}
    if isinstance(value, FunctionRef):
        return {"_target_": value.path, "_call_": False}
    if isinstance(value, Enum):
        return {
            "_target_": f"{type(value).__module__}.{type(value).__qualname__}",
            "_call_": True,
            "_args_": [encode(value.value)],
            "_name_": value.name,
        }
    if isinstance(value, functools.partial):
        out: dict[str, Any] = {"_target_": _path_of_callable(value.func), "_partial_": True}
        out["_args_"] = [encode(a) for a in value.args]
        for k, v in value.keywords.items():
            out[k] = encode(v)
        return out
    if isinstance(value, PurePath):
        if _annotation_allows(tp, Path):
            return str(value)
        return {"_target_": "pathlib.Path", "_call_": True, "_args_": [str(value)]}
    if isinstance(value, tuple):
        items = _encode_items(value, tp)
        if _annotation_allows(tp, tuple):
            return items
        return {"_target_": "builtins.tuple", "_call_": True, "_args_": [items]}
    if isinstance(value, list):
        return _encode_items(value, tp)
    if isinstance(value, (set, frozenset)):
        items = [encode(v) for v in sorted(value, key=repr)]
        if _annotation_allows(tp, set) or _annotation_allows(tp, frozenset):
            return items
        return {"_target_": f"builtins.{type(value).__name__}", "_call_": True, "_args_": [items]}
    if isinstance(value, dict):
        vt = _dict_value_type(tp)
        return {k: encode(v, vt) for k, v in value.items()}
    if DType.canonical_name(value) is not None:
        return {"_target_": DType(value).target, "_call_": False}
    if callable(value):
        return {"_target_": _path_of_callable(value), "_call_": False}
    raise CoerceError(
        f"a {type(value).__name__} cannot be saved to YAML", fix="use a plain value or a config class"
    )


def _path_of_callable(fn: Any) -> str:
    path = function_path(fn)
    if path is None:
        raise CoerceError(
            f"{fn!r} has no importable name and cannot be saved (lambdas and local functions cannot)",
            fix="define the function at module level",
        )
    return path


def _annotation_allows(tp: Any, kind: type) -> bool:
    for m in tu.union_members(tp):
        if m is kind or tu.origin(m) is kind:
            return True
        if kind is Path and isinstance(m, type) and issubclass(m, PurePath):
            return True
    return False


def _encode_items(items: Any, tp: Any) -> list[Any]:
    et = _item_type(tp)
    if isinstance(et, tuple):  # tuple[A, B]
        return [encode(v, t) for v, t in zip(items, et)]
    return [encode(v, et) for v in items]


def _item_type(tp: Any) -> Any:
    for m in tu.union_members(tp):
        o = tu.origin(m)
        if o in (list, set, frozenset) and tu.args(m):
            return tu.args(m)[0]
        if o is tuple and tu.args(m):
            a = tu.args(m)
            return a[0] if len(a) == 2 and a[1] is Ellipsis else a
    return Any


def _dict_value_type(tp: Any) -> Any:
    for m in tu.union_members(tp):
        if tu.origin(m) is dict and len(tu.args(m)) == 2:
            return tu.args(m)[1]
    return Any


# ----------------------------------------------------------------------------------------------
# decoding


def coerce(value: Any, tp: Any, path: str, ctx: DecodeContext) -> Any:
    """Turn `value` (YAML data, a dict, a parsed CLI string) into annotation `tp`.

    Raises `CoerceError` for a value that does not fit; nested config objects report their
    field problems into `ctx.problems` instead, so that one pass finds them all. A `${...}` value
    is returned as written and noted in `ctx.interpolations` (see `DecodeContext.defer`).
    """
    if ctx.defer and _defer_interpolation(value, path, ctx):
        return value
    if tp is Any or tp is object:
        return decode_any(value, path, ctx)
    if tu.is_union(tp):
        return _coerce_union(value, tp, path, ctx)
    if value is None:
        if tp is tu.NoneType:
            return None
        raise CoerceError(f"must not be null (expected {tu.type_name(tp)})")
    if tu.is_literal(tp):
        return coerce_literal(value, tp)
    if tp is DType:
        return coerce_dtype(value)
    if tp is FunctionRef or tu.is_callable_type(tp):
        return _coerce_function(value, path, ctx)
    o = tu.origin(tp)
    if o is not None:
        return _coerce_generic(value, tp, o, path, ctx)
    if isinstance(tp, type):
        from viaduct.config.base import ConfigBase

        if issubclass(tp, ConfigBase):
            return _coerce_config(value, tp, path, ctx)
        if issubclass(tp, Enum):
            return coerce_enum(value, tp)
        if tp is bool:
            return coerce_bool(value)
        if tp is int:
            return coerce_int(value)
        if tp is float:
            return coerce_float(value)
        if tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise CoerceError(f"expected a string, got {type(value).__name__}")
        if issubclass(tp, PurePath):
            if isinstance(value, (str, PurePath)):
                return Path(value)
            if isinstance(value, dict) and value.get("_target_", "").startswith("pathlib."):
                return Path(*value.get("_args_", []))
            raise CoerceError(f"expected a path, got {type(value).__name__}")
        if isinstance(value, tp):
            return value
    raise CoerceError(f"expected {tu.type_name(tp)}, got {type(value).__name__}")


def _coerce_union(value: Any, tp: Any, path: str, ctx: DecodeContext) -> Any:
    members: list[Any] = list(tu.union_members(tp))
    if value is None:
        if tu.NoneType in members:
            return None
        raise CoerceError(f"must not be null (expected {tu.type_name(tp)})")
    members = [m for m in members if m is not tu.NoneType]
    # An exact type match wins ("5" stays a str in `int | str`, 5 stays an int).
    for m in members:
        if isinstance(m, type) and type(value) is m:
            return value
    errors = []
    for m in members:
        n_before = len(ctx.problems)
        try:
            out = coerce(value, m, path, ctx)
        except CoerceError as exc:
            errors.append(exc)
            continue
        if len(ctx.problems) == n_before or len(members) == 1:
            return out
        # A sub-config that built with problems still counts: report them, keep its shape.
        return out
    if len(errors) == 1:
        raise errors[0]
    raise CoerceError(f"expected {tu.type_name(tp)}, got {describe(value)}")


def _coerce_function(value: Any, path: str, ctx: DecodeContext) -> Any:
    if isinstance(value, (FunctionRef, functools.partial)):
        return value
    if isinstance(value, dict):
        if value.get("_partial_"):
            return decode_any(value, path, ctx)
        if "_target_" in value and value.get("_call_") is False and len(value) <= 3:
            value = value["_target_"]
        else:
            raise CoerceError("expected a function name or {_target_: path, _call_: false}")
    if isinstance(value, str):
        ref = FunctionRef(value)
        if not is_allowed_function(ref.path):
            raise CoerceError(
                f"{value!r} is not a known function",
                fix="use an activation name (gelu, silu, relu, squared_relu, quick_gelu, ...), a torch "
                "activation or init function, or register it with viaduct.config.register_target",
            )
        return ref
    if callable(value):
        try:
            return FunctionRef(value)
        except ValueError as exc:
            raise CoerceError(str(exc)) from None
    raise CoerceError(f"expected a function, got {describe(value)}")


def _coerce_generic(value: Any, tp: Any, o: Any, path: str, ctx: DecodeContext) -> Any:
    a = tu.args(tp)
    if o in (list, tuple, set, frozenset):
        if isinstance(value, dict) and value.get("_target_", "").startswith("builtins."):
            value = (value.get("_args_") or [[]])[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise CoerceError(f"expected a list, got {describe(value)}")
        items = list(value)
        if o is tuple and a and not (len(a) == 2 and a[1] is Ellipsis):
            if len(items) != len(a):
                raise CoerceError(f"expected {len(a)} items, got {len(items)}")
            return tuple(coerce(v, t, f"{path}[{i}]", ctx) for i, (v, t) in enumerate(zip(items, a)))
        et = a[0] if a else Any
        out = [coerce(v, et, f"{path}[{i}]", ctx) for i, v in enumerate(items)]
        return o(out) if o is not list else out
    if o is dict:
        if not isinstance(value, dict):
            raise CoerceError(f"expected a mapping, got {describe(value)}")
        kt, vt = a if len(a) == 2 else (Any, Any)
        return {coerce(k, kt, path, ctx): coerce(v, vt, f"{path}.{k}", ctx) for k, v in value.items()}
    if tu.is_callable_type(tp):
        return _coerce_function(value, path, ctx)
    raise CoerceError(f"unsupported annotation {tu.type_name(tp)}")


def _coerce_config(value: Any, tp: type[ConfigBase], path: str, ctx: DecodeContext) -> ConfigBase:
    if isinstance(value, tp):
        return value
    if isinstance(value, str):
        return tp.from_string(value)
    if isinstance(value, dict):
        return build_config(tp, value, path, ctx)
    raise CoerceError(f"expected a {tp.__name__} (a mapping or a name), got {describe(value)}")


def move_sections(cls: type[ConfigBase], data: Any, path: str, ctx: DecodeContext) -> Any:
    """`data` with the sections `cls._moved_sections_` names moved into the components that own
    their fields (Megatron Bridge's `validation:` into `train`).

    Each section is decoded with its own class first (types, unknown and left-out keys, `_target_`),
    so its problems name the section's lines. A field also given, non-null and different, in the
    owning component is a conflict; a null there is Bridge's "not given" and the section's value wins.
    """
    moved = getattr(cls, "_moved_sections_", None)
    if not moved or not isinstance(data, dict) or not any(key in data for key in moved):
        return data
    data = dict(data)
    for key, (section_cls, owner) in moved.items():
        if key not in data:
            continue
        raw = data.pop(key)
        sub = f"{path}.{key}" if path else key
        if raw is None:
            continue
        if not isinstance(raw, dict):
            ctx.problem(sub, f"expected a mapping, got {describe(raw)}", raw)
            continue
        try:
            section = build_config(section_cls, raw, sub, ctx)
        except CoerceError as exc:
            ctx.problem(sub, exc.message, raw, exc.fix)
            continue
        given = [name for name in section_cls.spec().public_names() if name in raw]
        if not given:
            continue
        owner_path = f"{path}.{owner}" if path else owner
        current = data.get(owner)
        if current is None:
            current = {}
        elif not isinstance(current, dict):
            ctx.problem(owner_path, f"expected a mapping, got {describe(current)}", current)
            continue
        current = dict(current)
        for name in given:
            value, tp = getattr(section, name), section_cls.spec().fields[name].type
            there = current.get(name)
            if there is not None:
                try:
                    same = coerce(there, tp, owner_path, ctx) == value
                except CoerceError:
                    continue  # decoding the owner reports its value
                if same:
                    continue
                ctx.problem(
                    f"{owner_path}.{name}",
                    f"conflicts with {sub}.{name} ({value!r}); the value has one owner, {owner_path}.{name}",
                    there,
                    fix=f"keep one of {sub}.{name} / {owner_path}.{name}, or make them equal",
                )
                continue
            current[name] = encode(value, tp)
            if ctx.lines is not None and f"{sub}.{name}" in ctx.lines:
                ctx.lines[f"{owner_path}.{name}"] = ctx.lines[f"{sub}.{name}"]
        data[owner] = current
    return data


def build_config(base: type[ConfigBase], data: dict[str, Any], path: str, ctx: DecodeContext) -> ConfigBase:
    """A new config object from a mapping; field problems go to `ctx.problems`."""
    from viaduct.config.provenance import setting_source

    data = dict(data)
    target = data.pop("_target_", None)
    for k in ("_call_", "_name_"):
        data.pop(k, None)
    if target is not None:
        try:
            cls = config_class_for(target, base)
        except TargetError as exc:
            raise CoerceError(str(exc)) from None
    else:
        cls = base.concrete_class(path)
    data = move_sections(cls, data, path, ctx)
    spec = cls.spec()
    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, raw in data.items():
        sub = f"{path}.{key}" if path else str(key)
        info = spec.fields.get(key)
        if info is None:
            if key in cls.legacy_fields():
                ctx.dropped.append(sub)
                continue
            if ctx.strict:
                hint = ctx.hint(str(key), spec.public_names())
                ctx.problem(sub, f"no such field in {cls.__name__}", fix=hint or None)
            else:
                ctx.dropped.append(sub)
            continue
        if not info.init:  # derived values are recomputed by validate(), never loaded
            continue
        try:
            kwargs[key] = coerce_field(raw, info, sub, ctx)
        except CoerceError as exc:
            ctx.problem(sub, exc.message, raw, exc.fix)
            continue
        sources[key] = ctx.source_for(sub)
    missing = [f for f in spec.required() if f not in kwargs]
    for f in missing:
        sub = f"{path}.{f}" if path else f
        if f not in data:
            ctx.problem(sub, f"required field of {cls.__name__} is missing", fix=f"add {f}: ...")
        kwargs[f] = None  # placeholder so the object exists; the problem above is reported
    with setting_source(ctx.source):
        obj = cls(**kwargs)
    obj._record_sources(sources)
    return obj


def _defer_interpolation(value: Any, path: str, ctx: DecodeContext) -> bool:
    """Note a `${...}` value (a string, or a list holding one) for resolution after merging.

    A list is kept whole; a mapping is not deferred here: its keys or fields are, one by one, so
    that a key may refer to its sibling.
    """
    if (isinstance(value, str) and "${" in value) or (
        isinstance(value, list | tuple) and has_interpolation(value)
    ):
        ctx.interpolations.append((path, value))
        return True
    return False


def decode_any(value: Any, path: str, ctx: DecodeContext) -> Any:
    """Decode a value whose annotation says nothing: `_target_` mappings become objects."""
    if ctx.defer and _defer_interpolation(value, path, ctx):
        return value
    if isinstance(value, list):
        return [decode_any(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "_target_" not in value:
        return {k: decode_any(v, f"{path}.{k}", ctx) for k, v in value.items()}
    target = value["_target_"]
    try:
        obj = resolve_target(target)
    except TargetError as exc:
        raise CoerceError(str(exc)) from None
    from viaduct.config.base import ConfigBase

    if isinstance(obj, DType):
        return obj
    if isinstance(obj, type) and issubclass(obj, ConfigBase):
        return build_config(obj, value, path, ctx)
    if ctx.defer and has_interpolation(value):  # a call's arguments: the mapping is one value
        ctx.interpolations.append((path, value))
        return value
    args = [decode_any(a, path, ctx) for a in value.get("_args_") or []]
    kwargs = {k: decode_any(v, f"{path}.{k}", ctx) for k, v in value.items() if k not in SPECIAL_KEYS}
    if value.get("_partial_"):
        fn = FunctionRef(target) if callable(obj) and not isinstance(obj, type) else obj
        return Partial(fn, *args, **kwargs)
    if value.get("_call_") is False:
        if args or kwargs:
            raise CoerceError("a `_call_: false` target takes no arguments")
        if isinstance(obj, type):
            return obj
        return FunctionRef(target)
    if isinstance(obj, type) and issubclass(obj, Enum):
        return coerce_enum(value, obj)
    if target in (
        "pathlib.Path",
        "pathlib.PosixPath",
        "builtins.tuple",
        "builtins.set",
        "builtins.frozenset",
    ):
        return obj(*args, **kwargs)
    raise CoerceError(f"_target_ {target!r} cannot be called from a config file", fix="name a config class")


def coerce_field(raw: Any, info: FieldInfo, path: str, ctx: DecodeContext) -> Any:
    """`coerce` for a field, then `check_coerced` (unless part of it waits for interpolation)."""
    pending = len(ctx.interpolations)
    value = coerce(raw, info.type, path, ctx)
    if len(ctx.interpolations) == pending:
        check_coerced(value, info.type, allow_inf=info.allow_inf)
    return value
