"""Overrides on top of a Python config: partial YAML files and Hydra-style CLI strings.

Grammar, applied in order, all problems reported together:

* `a.b=v`   set an existing field (or dict key); setting inside a `None` sub-config creates it;
* `+a.b=v`  add: a new dict key, or a field whose value is still unset (None);
* `++a.b=v` set or add;
* `~a.b`    delete a dict key, or reset a field to its default (`~peft` removes PEFT).

Values are parsed as YAML (`[1,2]`, `{k: v}`, `null`, `true`) and coerced to the field's annotated
type. A sub-config can be switched by name (`peft=lora`), by mapping
(`peft={_target_: viaduct.peft.DoRA, dim: 8}`) or by `peft._target_=viaduct.peft.DoRA`.

A `${a.b}` value (in a file or an override) is kept as written while sources are merged and
resolved at the end, over the merged configuration (`viaduct.config.interpolation`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from viaduct.config import typing_utils as tu
from viaduct.config.base import ConfigBase
from viaduct.config.codec import (
    SPECIAL_KEYS,
    CoerceError,
    DecodeContext,
    build_config,
    check_coerced,
    coerce,
    move_sections,
)
from viaduct.config.errors import ConfigError, Problem, did_you_mean, join_limited
from viaduct.config.interpolation import record, resolve_interpolations
from viaduct.config.provenance import setting_source
from viaduct.config.targets import TargetError, config_class_for

T = TypeVar("T", bound=ConfigBase)

_OVERRIDE = re.compile(r"^(?P<op>~|\+\+|\+)?(?P<key>[A-Za-z_][\w]*(?:\.[\w\-]+)*)(?:=(?P<value>.*))?$", re.S)


def parse_value(text: str) -> Any:
    """A CLI value as YAML; text that is not valid YAML stays a string.

    Read with the same limits as a file (`yaml_io.load_yaml_value`): a value of anchors and
    aliases that would expand without bound is a `ConfigError`, not a string.
    """
    from viaduct.config.yaml_io import load_yaml_value

    if text == "":
        return ""
    try:
        return load_yaml_value(text, "override value")
    except yaml.YAMLError:
        return _parse_with_interpolations(text) if "${" in text else text


_HELD = "__vd_interpolation_{}__"
_REF = re.compile(r"(?<!\\)\$\{[^{}]*\}")


def _parse_with_interpolations(text: str) -> Any:
    """`[${a.b}, x]` is not YAML (braces are flow syntax): read it with each `${...}` held as a
    plain word, then put the references back into the strings they ended up in."""
    from viaduct.config.yaml_io import load_yaml_value

    refs: list[str] = []

    def hold(m: re.Match[str]) -> str:
        refs.append(m.group(0))
        return _HELD.format(len(refs) - 1)

    if "__vd_interpolation_" in text:
        return text
    try:
        value = load_yaml_value(_REF.sub(hold, text), "override value")
    except yaml.YAMLError:
        return text

    def put_back(v: Any) -> Any:
        if isinstance(v, str):
            return re.sub(r"__vd_interpolation_(\d+)__", lambda m: refs[int(m.group(1))], v)
        if isinstance(v, list):
            return [put_back(x) for x in v]
        if isinstance(v, dict):
            return {put_back(k): put_back(x) for k, x in v.items()}
        return v

    return put_back(value)


def config_type_in(tp: Any) -> type[ConfigBase] | None:
    """The config class an annotation admits (`LoRA | None` -> LoRA), if any."""
    for m in tu.union_members(tp):
        if isinstance(m, type) and issubclass(m, ConfigBase):
            return m
    return None


def _new_config(tp: Any, current: Any) -> ConfigBase:
    """A sub-config to set fields on, where the field holds None (or a recipe name)."""
    cls = config_type_in(tp)
    if cls is None:
        raise CoerceError("is not a sub-config")
    if isinstance(current, str):
        return cls.from_string(current)
    return cls.concrete_class()()


def merge_mapping(
    obj: ConfigBase,
    mapping: Mapping[str, Any],
    path: str,
    ctx: DecodeContext,
    base: type[ConfigBase] | None = None,
) -> ConfigBase:
    """Apply a (partial) mapping onto `obj` in place; returns `obj`, or its replacement when the
    mapping's `_target_` names another class."""
    target = mapping.get("_target_")
    if target is not None:
        try:
            cls = config_class_for(target, base or type(obj))
        except TargetError as exc:
            ctx.problem(f"{path}._target_" if path else "_target_", str(exc), target)
            return obj
        if cls is not type(obj):
            return build_config(base or type(obj), dict(mapping), path, ctx)
    mapping = move_sections(type(obj), dict(mapping), path, ctx)
    spec = type(obj).spec()
    for key, raw in mapping.items():
        if key in SPECIAL_KEYS:
            continue
        sub = f"{path}.{key}" if path else str(key)
        info = spec.fields.get(key)
        if info is None:
            if key in type(obj).legacy_fields() or not ctx.strict:
                ctx.dropped.append(sub)
                continue
            hint = ctx.hint(str(key), spec.public_names())
            ctx.problem(sub, f"no such field in {type(obj).__name__}", fix=hint or None)
            continue
        if info.derived:
            continue
        current = getattr(obj, key)
        pending = len(ctx.interpolations)
        try:
            value = _merged_value(current, raw, info.type, sub, ctx)
            if len(ctx.interpolations) == pending:
                check_coerced(value, info.type, allow_inf=info.allow_inf)
        except CoerceError as exc:
            ctx.problem(sub, exc.message, raw, exc.fix)
            continue
        if value is not current:
            with setting_source(ctx.source_for(sub)):
                setattr(obj, key, value)
    return obj


def _merged_value(current: Any, raw: Any, tp: Any, path: str, ctx: DecodeContext) -> Any:
    cls = config_type_in(tp)
    if cls is not None and isinstance(raw, dict):
        if isinstance(current, ConfigBase):
            return merge_mapping(current, raw, path, ctx, base=cls)
        if "_target_" not in raw:
            return merge_mapping(_new_config(tp, current), raw, path, ctx, base=cls)
    if isinstance(raw, dict) and isinstance(current, dict) and "_target_" not in raw:
        merged = dict(current)
        merged.update(coerce(raw, tp, path, ctx))
        return merged
    return coerce(raw, tp, path, ctx)


def _raise_if_problems(ctx: DecodeContext, header: str) -> None:
    if ctx.problems:
        raise ConfigError(ctx.problems, header=header)
    if ctx.dropped:
        from viaduct.config.errors import warn

        warn(f"{ctx.source}: dropped {len(ctx.dropped)} unknown key(s): {join_limited(ctx.dropped)}")


def apply_overrides(cfg: T, overrides: Iterable[str] | Mapping[str, Any], *, source: str = "CLI") -> T:
    """Apply overrides to `cfg` in place and return it (see the module docstring for the grammar).

    A mapping is merged like a partial YAML file. Every problem is reported in one `ConfigError`.
    """
    if isinstance(overrides, Mapping):
        ctx = DecodeContext(source=source)
        result = merge_mapping(cfg, overrides, "", ctx)
        record(result, ctx)
        _raise_if_problems(ctx, "invalid overrides")
        resolve_interpolations(result)
        return result  # type: ignore[return-value]
    if isinstance(overrides, str):
        overrides = [overrides]
    problems: list[Problem] = []
    for text in overrides:
        problems.extend(_apply_one(cfg, text, source))
    if problems:
        raise ConfigError(problems, header="invalid overrides")
    resolve_interpolations(cfg)
    return cfg


def _apply_one(root: ConfigBase, text: str, source: str) -> list[Problem]:
    src = f"{source} {text!r}"
    m = _OVERRIDE.match(text.strip())
    if m is None:
        return [
            Problem(
                "",
                f"cannot parse override {text!r}",
                fix="write key.path=value, +key=value, ++key=value or ~key",
                source=source,
            )
        ]
    op, key, raw = m.group("op") or "", m.group("key"), m.group("value")
    if op != "~" and raw is None:
        return [Problem(key, f"override {text!r} has no value", fix=f"write {key}=VALUE", source=source)]
    try:
        value = parse_value(raw) if raw is not None else None
    except ConfigError as exc:
        return [p if p.path else replace(p, path=key) for p in exc.problems]
    ctx = DecodeContext(source=src)
    try:
        parts = _moved_path(type(root), key.split("."))
        _apply_path(root, parts, op, value, raw, ctx)
    except CoerceError as exc:
        ctx.problem(
            key,
            exc.message,
            value if raw is not None else Problem.__dataclass_fields__["value"].default,
            exc.fix,
        )
    record(root, ctx)  # a `${...}` value waits for the end of the merge (resolve_interpolations)
    return ctx.problems


def _moved_path(root: type[ConfigBase], parts: list[str]) -> list[str]:
    """`validation.eval_iters` -> `train.eval_iters`: a field of a section the root keeps in another
    component (`_moved_sections_`) is set where it lives. Other paths are returned unchanged."""
    moved = getattr(root, "_moved_sections_", {}).get(parts[0])
    if moved is None or len(parts) != 2:
        return parts
    section_cls, owner = moved
    if parts[1] in section_cls.spec().fields:
        return [owner, parts[1]]
    reason = section_cls.legacy_fields().get(parts[1])
    if reason is not None:
        raise CoerceError(
            f"is left out of viaduct: {reason}", fix=f"remove the override of {'.'.join(parts)}"
        )
    return parts


def _apply_path(
    root: ConfigBase, parts: list[str], op: str, value: Any, raw: str | None, ctx: DecodeContext
) -> None:
    # Walk to the parent of the last key, remembering how each object hangs off its owner.
    owner: Any = None
    owner_key = ""
    owner_tp: Any = type(root)
    obj: Any = root
    tp: Any = type(root)
    created = False  # `+a.b=v` may add `a` itself when it was unset
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(obj, ConfigBase):
            info = type(obj).spec().fields.get(part)
            if info is None or part.startswith("_"):
                raise CoerceError(
                    f"no such field in {type(obj).__name__}",
                    fix=did_you_mean(part, type(obj).spec().public_names()) or None,
                )
            child = getattr(obj, part)
            if (child is None or isinstance(child, str)) and config_type_in(info.type) is not None:
                if op == "~":
                    raise CoerceError(f"{where} is not set, nothing to delete")
                child = _new_config(info.type, child)
                created = True
                with setting_source(ctx.source):
                    setattr(obj, part, child)
            owner, owner_key, owner_tp = obj, part, info.type
            obj, tp = child, info.type
        elif isinstance(obj, dict):
            if part not in obj:
                if op in ("+", "++"):
                    obj[part] = {}
                else:
                    raise CoerceError(
                        f"no key {part!r} in {where.rsplit('.', 1)[0]}",
                        fix=f"use +{'.'.join(parts)}=... to add it",
                    )
            owner, owner_key, owner_tp = obj, part, tp
            obj, tp = obj[part], codec_dict_value_type(tp)
        else:
            raise CoerceError(f"{where} is a {type(obj).__name__}, not a sub-config or mapping")
    last = parts[-1]
    path = ".".join(parts)
    if isinstance(obj, ConfigBase):
        if last == "_target_":
            _switch_class(owner, owner_key, owner_tp, obj, value, ctx)
            return
        _set_field(obj, last, "++" if created and op == "+" else op, value, path, ctx)
    elif isinstance(obj, dict):
        vt = codec_dict_value_type(tp)
        if op == "~":
            if last not in obj:
                raise CoerceError(f"no key {last!r} to delete")
            del obj[last]
            return
        if op == "" and last not in obj:
            raise CoerceError(f"no key {last!r}", fix=f"use +{path}=... to add a key")
        if op == "+" and last in obj:
            raise CoerceError(f"key {last!r} already exists", fix=f"use {path}=... or ++{path}=...")
        pending = len(ctx.interpolations)
        item = coerce(value, vt, path, ctx)
        if len(ctx.interpolations) == pending:
            check_coerced(item, vt)
        obj[last] = item
    else:
        raise CoerceError(f"{'.'.join(parts[:-1])} is a {type(obj).__name__}, not a sub-config or mapping")


def codec_dict_value_type(tp: Any) -> Any:
    from viaduct.config.codec import _dict_value_type

    return _dict_value_type(tp)


def _set_field(obj: ConfigBase, name: str, op: str, value: Any, path: str, ctx: DecodeContext) -> None:
    spec = type(obj).spec()
    info = spec.fields.get(name)
    if info is None or name.startswith("_"):
        raise CoerceError(
            f"no such field in {type(obj).__name__}", fix=did_you_mean(name, spec.public_names()) or None
        )
    if info.derived:
        raise CoerceError(
            "is derived by validate() and cannot be set", fix="set the fields it is computed from"
        )
    current = getattr(obj, name)
    if op == "~":
        if info.required:
            raise CoerceError("is required and cannot be deleted", fix=f"set {path}=... instead")
        with setting_source("default"):
            object.__setattr__(obj, name, info.default_value())
        obj.__dict__.get("_vd_prov", {}).pop(name, None)
        return
    if op == "+" and current is not None and not isinstance(current, dict):
        raise CoerceError(
            f"already has a value ({current!r})", fix=f"use {path}=... or ++{path}=... to replace it"
        )
    pending = len(ctx.interpolations)
    if isinstance(current, dict) and isinstance(value, dict) and op in ("+", "++"):
        new_value = dict(current)
        new_value.update(coerce(value, info.type, path, ctx))
    else:
        new_value = _merged_value(current, value, info.type, path, ctx)
    if len(ctx.interpolations) == pending:
        check_coerced(new_value, info.type, allow_inf=info.allow_inf)
    if new_value is not current:
        with setting_source(ctx.source):
            setattr(obj, name, new_value)


def _switch_class(
    owner: Any, key: str, owner_tp: Any, obj: ConfigBase, target: Any, ctx: DecodeContext
) -> None:
    """`peft._target_=viaduct.peft.DoRA`: a new object of that class, keeping the fields the user set."""
    base = config_type_in(owner_tp) or type(obj)
    if not isinstance(target, str):
        raise CoerceError("_target_ must be a dotted class path")
    try:
        cls = config_class_for(target, base)
    except TargetError as exc:
        raise CoerceError(str(exc)) from None
    if owner is None:
        raise CoerceError("the root object's class cannot be switched")
    kept = {
        n: getattr(obj, n)
        for n, f in type(obj).spec().fields.items()
        if f.init and n in cls.spec().fields and obj.source_of(n) != "default"
    }
    with setting_source(ctx.source):
        new = cls(**kept)
        if isinstance(owner, dict):
            owner[key] = new
        else:
            setattr(owner, key, new)


def process_config_with_overrides(
    config: T,
    config_filepath: str | Path | None = None,
    cli_overrides: Iterable[str] | None = None,
    *,
    strict: bool = True,
    resolve: bool = True,
) -> T:
    """recipe < YAML file < CLI: merge a partial YAML file, then apply CLI overrides, in place.

    The YAML file needs no `_target_` keys (a plain nested mapping like `train: {train_iters: 10}`).
    Unknown keys are errors with file:line. `${a.b}` interpolations (in the file or the overrides)
    are resolved at the end, over the merged configuration; `resolve=False` leaves that to the
    caller's `resolve_interpolations(config)`, for a caller that merges more sources after this.
    """
    from viaduct.config.yaml_io import load_yaml_file

    problems: list[Problem] = []
    if config_filepath is not None:
        data, lines = load_yaml_file(config_filepath)
        ctx = DecodeContext(strict=strict, source=f"file {config_filepath}", lines=lines)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                Problem(
                    "",
                    "expected a mapping at the top level",
                    type(data).__name__,
                    source=str(config_filepath),
                )
            )
        config = merge_mapping(config, data, "", ctx)  # type: ignore[assignment]
        record(config, ctx)
        problems.extend(ctx.problems)
        if ctx.dropped:
            from viaduct.config.errors import warn

            warn(f"{ctx.source}: dropped {len(ctx.dropped)} key(s): {join_limited(ctx.dropped)}")
    if cli_overrides:
        for text in cli_overrides:
            problems.extend(_apply_one(config, text, "CLI"))
    if problems:
        raise ConfigError(problems, header="invalid configuration overrides")
    if resolve:
        resolve_interpolations(config)
    return config
