"""`ConfigBase`: what every viaduct config dataclass shares.

Subclasses are plain `@dataclass(kw_only=True)` classes with one attribute docstring per field.
The base adds:

* typo safety: assigning a name that is not a field raises `AttributeError` with suggestions;
* value normalization on assignment: dtype and function fields hold the torch objects once torch
  is imported and a `DType` / `FunctionRef` naming them before (configs never need torch to be
  built or saved), a list given for a tuple field becomes the tuple, an int for a float field a float;
* provenance: who set each value (see `viaduct.config.provenance`);
* serialization: `to_dict`/`from_dict`, `to_yaml`/`from_yaml`, `print_yaml`;
* the lazy-validation hooks: `finalize()` (override it) and `derive()` for derived values.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

from viaduct.config import provenance as prov
from viaduct.config import typing_utils as tu
from viaduct.config.errors import ConfigError, did_you_mean, join_limited, warn
from viaduct.config.types import DType, FunctionRef, Partial, as_torch_object

T = TypeVar("T", bound="ConfigBase")

_MISSING = dataclasses.MISSING
_registry: dict[str, type] = {}
_by_target: dict[str, type] = {}
_PROV = "_vd_prov"
_READY = "_vd_ready"
_PREV = "_vd_prev"
_OWN = "_vd_own_derived"


def unsupported(reason: str, default: Any = None, **kwargs: Any) -> Any:
    """A field whose feature is not built yet: any value but the default fails validation.

    `reason` completes the sentence "... is not supported yet": e.g. "FP8 training".
    """
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["unsupported"] = reason
    if "default_factory" in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def allow_infinity(default: float = math.inf, **kwargs: Any) -> Any:
    """A float field for which infinity is a meaningful setting (a threshold that is never reached).

    Every other float field must hold a finite number: NaN or infinity passes every `<`/`>` range
    check unnoticed and surfaces mid-run (a NaN learning rate, a clipping threshold that never
    clips). NaN stays refused here too.
    """
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["allow_inf"] = True
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def derived(default: Any = None) -> Any:
    """A value computed by `finalize()`/`validate()`: not a constructor argument, not loaded from YAML."""
    return dataclasses.field(default=default, init=False, compare=False, metadata={"derived": True})


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: Any
    default: Any
    default_factory: Any
    init: bool
    derived: bool
    unsupported: str | None
    normalize: str | None  # "dtype" | "function" | "float" | "tuple" | None
    allow_inf: bool = False
    """The field may hold ±infinity (`allow_infinity`); other float fields must be finite."""

    @property
    def required(self) -> bool:
        return self.init and self.default is _MISSING and self.default_factory is _MISSING

    def default_value(self) -> Any:
        if self.default is not _MISSING:
            return self.default
        if self.default_factory is not _MISSING:
            return self.default_factory()
        return _MISSING


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    fields: dict[str, FieldInfo]

    def public_names(self) -> list[str]:
        return [n for n, f in self.fields.items() if not n.startswith("_")]

    def required(self) -> list[str]:
        return [n for n, f in self.fields.items() if f.required]


def _normalizer_kind(tp: Any) -> str | None:
    members = tu.union_members(tp)
    if DType in members:
        return "dtype"
    if FunctionRef in members or any(tu.is_callable_type(m) for m in members):
        return "function"
    if float in members and int not in members:
        return "float"  # 16 and 16.0 are the same setting; keep one spelling so YAML is stable
    if tu.mentions_tuple(tp):
        return "tuple"  # a list given where a tuple is annotated becomes the tuple
    return None


def config_class_by_name(name: str) -> type | None:
    return _registry.get(name)


def config_class_by_target(path: str) -> type | None:
    return _by_target.get(path)


def all_config_classes() -> list[type]:
    return list(_registry.values())


class ConfigBase:
    """Base of every config dataclass (see the module docstring)."""

    _abstract_config_: ClassVar[bool] = False
    """True on a base class that is never built itself (a YAML mapping for it needs `_target_`)."""
    _aliases_: ClassVar[tuple[str, ...]] = ()
    """Short names that select this class where its base is expected (`peft=lora`)."""
    _unsupported_: ClassVar[str | None] = None
    """Set on a whole component whose feature is not built yet ("fault tolerance")."""
    _legacy_fields_: ClassVar[dict[str, str]] = {}
    """Megatron fields viaduct leaves out, with why; accepted (and dropped) when loading its YAML."""
    _moved_sections_: ClassVar[dict[str, tuple[type[ConfigBase], str]]] = {}
    """Megatron sections whose fields viaduct keeps in another component: key -> (the section's class,
    the component that owns its fields). Loading moves the section's fields there (`move_sections`)."""
    _fields_listed_last_: ClassVar[bool] = False
    """True on a base class holding compatibility fields that viaduct does not act on: wherever fields
    are listed (`spec()`: YAML, `--help`, the JSON Schema, problem lists) they come after the fields
    of the classes built on it, although a dataclass puts a base's fields first."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        existing = _registry.get(cls.__name__)
        # viaduct's own classes keep their names; a user class of the same name does not shadow them.
        if existing is None or not existing.__module__.startswith("viaduct."):
            _registry[cls.__name__] = cls
        # Config classes already defined (imported by trusted code) may be named in YAML.
        _by_target[f"{cls.__module__}.{cls.__qualname__}"] = cls
        if "_abstract_config_" not in cls.__dict__:
            cls._abstract_config_ = False

    # ------------------------------------------------------------------ class-level introspection

    @classmethod
    def spec(cls) -> ClassSpec:
        spec = cls.__dict__.get("_vd_spec")
        if spec is None:
            hints = typing.get_type_hints(cls)
            infos = {}
            for f in _listing_order(cls):
                tp = hints.get(f.name, Any)
                infos[f.name] = FieldInfo(
                    name=f.name,
                    type=tp,
                    default=f.default,
                    default_factory=f.default_factory,
                    init=f.init,
                    derived=bool(f.metadata.get("derived")) or not f.init,
                    unsupported=f.metadata.get("unsupported"),
                    normalize=_normalizer_kind(tp),
                    allow_inf=bool(f.metadata.get("allow_inf")),
                )
            spec = ClassSpec(infos)
            type.__setattr__(cls, "_vd_spec", spec)
        return spec

    @classmethod
    def target(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def legacy_fields(cls) -> dict[str, str]:
        out: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("_legacy_fields_", {}))
        return out

    @classmethod
    def variants(cls) -> list[type[ConfigBase]]:
        """This class and its subclasses that can be built."""
        out: list[type[ConfigBase]] = []
        todo: list[type[ConfigBase]] = [cls]
        while todo:
            c = todo.pop(0)
            if not c.__dict__.get("_abstract_config_", False) and dataclasses.is_dataclass(c):
                out.append(c)
            todo.extend(c.__subclasses__())
        return out

    @classmethod
    def variant(cls, name: str) -> type[ConfigBase]:
        """The subclass selected by a short name ("lora") or class name ("LoRA")."""
        from viaduct.config.codec import CoerceError

        low = name.strip().lower().replace("-", "_")
        choices = cls.variants()
        for c in choices:
            if low in c._aliases_ or low == c.__name__.lower():
                return c
        names = [a for c in choices for a in (c._aliases_ or (c.__name__,))]
        hint = did_you_mean(low, names)
        raise CoerceError(
            f"{name!r} does not name a {cls.__name__}", fix=hint or f"use one of {', '.join(names)}"
        )

    @classmethod
    def from_string(cls, name: str) -> ConfigBase:
        """The object a plain string selects where this class is expected (`peft=lora`)."""
        return cls.variant(name)()

    @classmethod
    def concrete_class(cls, path: str = "") -> type[ConfigBase]:
        """The class to build for a mapping without `_target_`."""
        from viaduct.config.codec import CoerceError

        if not cls.__dict__.get("_abstract_config_", False):
            return cls
        names = [a for c in cls.variants() for a in (c._aliases_[:1] or (c.__name__,))]
        raise CoerceError(
            f"{cls.__name__} has several kinds; say which",
            fix=f"give `_target_` or a name ({', '.join(names)})",
        )

    # ------------------------------------------------------------------ attribute protocol

    def __setattr__(self, name: str, value: Any) -> None:
        info = type(self).spec().fields.get(name)
        if info is None:
            if name.startswith("_"):
                object.__setattr__(self, name, value)
                return
            hint = did_you_mean(name, type(self).spec().public_names())
            raise AttributeError(
                f"{type(self).__name__}.{name}: no such field" + (f"; {hint}" if hint else "")
            )
        d = self.__dict__
        ready = _READY in d
        if info.derived and ready:
            raise AttributeError(
                f"{type(self).__name__}.{name} is derived by validate() and cannot be set; "
                "set the fields it is computed from instead"
            )
        if info.normalize is not None and value is not None:
            value = _normalize(info, value)
        elif type(value) is functools.partial:  # compare by value, like every other config value
            value = Partial(value.func, *value.args, **value.keywords)
        object.__setattr__(self, name, value)
        sources = d.get(_PROV)
        if sources is None:
            sources = {}
            object.__setattr__(self, _PROV, sources)
        if ready:
            sources[name] = prov.current_source()
        elif not info.derived and not _is_default(info, value):
            sources[name] = prov.current_source()

    def __post_init__(self) -> None:
        object.__setattr__(self, _READY, True)

    def __deepcopy__(self, memo: dict[int, Any]) -> ConfigBase:
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    # ------------------------------------------------------------------ provenance

    def _record_sources(self, sources: dict[str, str]) -> None:
        self.__dict__.setdefault(_PROV, {}).update(sources)

    def source_of(self, name: str) -> str:
        """Where the value of field `name` came from ("default", "python x.py:3", "file a.yaml:2", ...)."""
        return self.__dict__.get(_PROV, {}).get(name, prov.DEFAULT)

    def provenance(self, prefix: str = "") -> dict[str, str]:
        """Dotted path -> source for every field of this object and its sub-configs."""
        out: dict[str, str] = {}
        for name in type(self).spec().public_names():
            path = f"{prefix}.{name}" if prefix else name
            value = self.__dict__.get(name)
            out[path] = self.source_of(name)
            if isinstance(value, ConfigBase):
                out.update(value.provenance(path))
        return out

    def derive(self, name: str, value: Any, reason: str = "", *, own: bool = False) -> None:
        """Set a value computed by validation; the next validate() recomputes it from scratch.

        Called by an object's own `finalize()` and by whoever derives across objects (the container
        syncing sequence lengths, a mixed-precision recipe, the tokenizer filling `vocab_size`).
        `reason` is shown in the provenance: `derived (reason)`.

        `own=True` marks a value this object's own finalize() derives, so that a standalone
        finalize() can recompute it (`_undo_own_derivations`) without undoing what the container
        derived (mixed precision, sequence length).
        """
        info = type(self).spec().fields[name]
        if info.normalize is not None and value is not None:
            value = _normalize(info, value)
        sources = self.__dict__.setdefault(_PROV, {})
        previous = sources.get(name)
        if prov.is_user_set(previous):
            # Remember what the user set, so the next validate() starts from it again.
            self.__dict__.setdefault(_PREV, {})[name] = (self.__dict__.get(name), previous)
        object.__setattr__(self, name, value)
        sources[name] = prov.DERIVED_PREFIX + (f" ({reason})" if reason else "")
        if own:
            self.__dict__.setdefault(_OWN, {})[name] = sources[name]

    def _undo_own_derivations(self) -> None:
        """Reset what the previous finalize() derived, unless something else has set it since.

        The field goes back to what the user set before the derivation (an explicit None included),
        and only to the class default when the user never set it: a subclass default (a named
        provider's num_query_groups) must not replace the user's null on a second finalize().
        """
        previous = self.__dict__.get(_PREV, {})
        for name, source in self.__dict__.pop(_OWN, {}).items():
            if self.source_of(name) != source:
                continue
            if name in previous:
                value, self.__dict__[_PROV][name] = previous.pop(name)
                object.__setattr__(self, name, value)
            else:
                object.__setattr__(self, name, type(self).spec().fields[name].default_value())
                self.__dict__[_PROV].pop(name, None)

    def _reset_derived(self) -> None:
        """Undo every derived value (recursively) so validate() starts from the user's values."""
        sources = self.__dict__.get(_PROV, {})
        previous = self.__dict__.get(_PREV, {})
        for name, info in type(self).spec().fields.items():
            if prov.is_derived(sources.get(name)) or (info.derived and name in self.__dict__):
                if name in previous:
                    value, sources[name] = previous.pop(name)
                    object.__setattr__(self, name, value)
                else:
                    object.__setattr__(self, name, info.default_value() if not info.required else None)
                    sources.pop(name, None)
            value = self.__dict__.get(name)
            if isinstance(value, ConfigBase):
                value._reset_derived()

    # ------------------------------------------------------------------ lazy validation

    def finalize(self) -> None:
        """Derive dependent values and check this object; raise `ConfigError` with every problem.

        Idempotent. Called by `ConfigContainer.validate()` in a fixed order, or directly by a
        standalone user (`provider.finalize()`).
        """

    def check_types(self, prefix: str = "") -> list:
        """Problems of fields whose value does not fit the annotation, and of unsupported settings.

        Float fields must be finite unless declared with `allow_infinity`; function fields must
        name an allowed function. Once torch is imported, a dtype or function field still holding a
        `DType` / `FunctionRef` (set before the import) is replaced by the torch object, so what
        `validate()` hands to training is what the user's own code would compare against.
        """
        from viaduct.config.codec import check_type
        from viaduct.config.errors import Problem

        problems = []
        cls = type(self)
        if cls._unsupported_:
            problems.append(
                Problem(prefix, f"{cls._unsupported_} is not supported yet", fix=f"remove {prefix or 'it'}")
            )
            return problems
        for name, info in cls.spec().fields.items():
            if name.startswith("_") or info.derived:
                continue
            path = f"{prefix}.{name}" if prefix else name
            value = self.__dict__.get(name)
            reason = check_type(value, info.type, allow_inf=info.allow_inf)
            if reason is not None:
                problems.append(Problem(path, reason, value, None, self.source_of(name)))
                continue
            if info.normalize in ("dtype", "function") and isinstance(value, DType | FunctionRef):
                # Not an assignment: the value and its provenance stay what the user set.
                object.__setattr__(self, name, as_torch_object(value))
            if info.unsupported and not _is_default(info, value):
                problems.append(
                    Problem(
                        path,
                        f"{info.unsupported} is not supported yet",
                        value,
                        f"leave {path} at its default ({_default_repr(info)})",
                        self.source_of(name),
                    )
                )
            if isinstance(value, ConfigBase):
                problems.extend(value.check_types(path))
        return problems

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """`{"_target_": "pkg.Class", field: value, ...}` with every public field, recursively."""
        from viaduct.config.codec import CoerceError, encode

        out: dict[str, Any] = {"_target_": type(self).target()}
        for name, info in type(self).spec().fields.items():
            if name.startswith("_"):
                continue
            try:
                out[name] = encode(self.__dict__.get(name), info.type)
            except CoerceError as exc:
                raise ConfigError(
                    [_problem(name, exc.message, self.__dict__.get(name), exc.fix, self.source_of(name))],
                    header=f"cannot serialize {type(self).__name__}",
                ) from None
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, strict: bool = True, source: str = "dict") -> T:
        """Build from `to_dict()` output (or any mapping of fields, `_target_` optional).

        Strict (the default): unknown keys are errors, all listed with suggestions. Lenient
        (`strict=False`, for checkpoints written by older versions): unknown keys are dropped and
        reported in one `ConfigWarning`.
        """
        from viaduct.config.codec import CoerceError, DecodeContext, build_config

        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
        ctx = DecodeContext(strict=strict, source=source)
        return _finish_decode(cls, data, ctx, build_config, CoerceError)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The YAML text of `to_dict()`; written to `path` when given (parents are created)."""
        from viaduct.config.yaml_io import dump_yaml

        text = dump_yaml(self.to_dict())
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        return text

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, *, strict: bool = True) -> T:
        """Load a YAML file written by `to_yaml()` (`${a.b}` interpolations are resolved)."""
        from viaduct.config.codec import CoerceError, DecodeContext, build_config
        from viaduct.config.yaml_io import load_yaml_file

        data, lines = load_yaml_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        ctx = DecodeContext(strict=strict, source=f"file {path}", lines=lines)
        return _finish_decode(cls, data, ctx, build_config, CoerceError)

    def print_yaml(self, *, provenance: bool = False, file: IO[str] | None = None) -> None:
        """Print the YAML form; with `provenance=True` each value is followed by where it came from."""
        from viaduct.config.yaml_io import dump_yaml, dump_yaml_with_comments

        out = file or sys.stdout
        if provenance:
            out.write(dump_yaml_with_comments(self.to_dict(), self.provenance()))
        else:
            out.write(dump_yaml(self.to_dict()))

    def walk(self, prefix: str = "") -> Iterator[tuple[str, ConfigBase]]:
        """(dotted path, object) for this object and every nested config object."""
        yield prefix, self
        for name in type(self).spec().public_names():
            value = self.__dict__.get(name)
            if isinstance(value, ConfigBase):
                yield from value.walk(f"{prefix}.{name}" if prefix else name)


def _listing_order(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields of `cls`, those declared by a `_fields_listed_last_` base moved to the end
    (each group keeps its declaration order)."""
    fields = dataclasses.fields(cls)
    last = {
        name
        for klass in cls.__mro__
        if klass.__dict__.get("_fields_listed_last_", False)
        for name in inspect.get_annotations(klass)
    }
    return [f for f in fields if f.name not in last] + [f for f in fields if f.name in last]


def _problem(*args: Any):
    from viaduct.config.errors import Problem

    return Problem(*args)


def _finish_decode(cls: type[T], data: dict[str, Any], ctx: Any, build_config: Any, coerce_error: Any) -> T:
    if "_target_" not in data and cls._abstract_config_:
        raise ConfigError(f"{cls.__name__}: the mapping needs a `_target_`")
    try:
        obj = build_config(cls, data, "", ctx)
    except coerce_error as exc:
        ctx.problem("", exc.message, fix=exc.fix)
        obj = None
    if ctx.problems:
        raise ConfigError(ctx.problems, header=f"cannot load {cls.__name__} from {ctx.source}")
    if ctx.dropped:
        warn(f"{ctx.source}: dropped {len(ctx.dropped)} unknown key(s): {join_limited(ctx.dropped)}")
    from viaduct.config.interpolation import record, resolve_interpolations

    record(obj, ctx)
    resolve_interpolations(obj)
    return obj


def _normalize(info: FieldInfo, value: Any) -> Any:
    kind = info.normalize
    if kind == "float":
        return float(value) if type(value) is int else value
    if kind == "tuple":
        return tu.tuples_for_lists(value, info.type)
    try:
        if kind == "dtype":
            if DType.canonical_name(value) is not None and not isinstance(value, str | DType):
                return value if "torch" in sys.modules else DType(value)  # a torch.dtype
            return as_torch_object(value if isinstance(value, DType) else DType(value))
        if isinstance(value, functools.partial):
            return value if type(value) is Partial else Partial(value.func, *value.args, **value.keywords)
        if isinstance(value, FunctionRef):
            return as_torch_object(value)
        if isinstance(value, str):
            return as_torch_object(FunctionRef(value))
        if callable(value):
            # The function itself once torch is imported; before, a named reference to it.
            return value if "torch" in sys.modules else FunctionRef(value)
        return value
    except ValueError:
        return value  # left as given; check_types() reports it with the field path


def _is_default(info: FieldInfo, value: Any) -> bool:
    if info.default is not _MISSING:
        d = info.default
        return (
            value is d
            or (type(value) is type(d) and value == d)
            or (info.normalize is not None and value == d)
        )
    if info.default_factory is not _MISSING:
        cache = _factory_defaults.get(info.default_factory, _MISSING)
        if cache is _MISSING:
            cache = info.default_factory()
            _factory_defaults[info.default_factory] = cache
        return type(value) is type(cache) and value == cache
    return False


_factory_defaults: dict[Any, Any] = {}


def _default_repr(info: FieldInfo) -> str:
    value = info.default_value()
    return "unset" if value is _MISSING else repr(value)
