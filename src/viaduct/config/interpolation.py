"""`${a.b}` interpolation, resolved over the whole configuration once every source is merged.

A YAML file, a mapping or an override may give a value as `${train.train_iters}` (that field's
value, with its type), as text around references (`run-${train.train_iters}`), relative to the key
it sits in (`${.sibling}`, `${..uncle.x}`), or write `\\${` for a literal `${`. Loaders leave such
a value in place and note it (`DecodeContext.interpolations`); `record()` keeps it on the root
object as a binding, and `resolve_interpolations()` evaluates every binding over the merged
configuration. Recipe < file < command line is merged first, so `eval_iters: ${train.train_iters}`
in a file follows `train.train_iters=99` given on the command line.

A binding stays live while its field holds what the binding put there: a later resolution (the
next `apply_overrides`, say) evaluates it again. Anything that assigns the field since — a file, an
override, Python code — ends it.

A hostile file cannot make this grow without bound: one interpolated text is at most `MAX_TEXT`
characters, and one resolution produces at most `MAX_TOTAL` characters and items in all, so a
chain of strings that each repeat the previous one ten times stops at its first long link.
Resolvers (`${oc.env:HOME}`) are not supported: a configuration file does not get to read the
environment.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from viaduct.config.errors import ConfigError, Problem, did_you_mean

if TYPE_CHECKING:
    from viaduct.config.base import ConfigBase
    from viaduct.config.codec import DecodeContext

MAX_TEXT = 100_000
"""The longest text one interpolated value may produce, in characters."""
MAX_TOTAL = 10_000_000
"""What one resolution may produce in all: characters of text plus items of copied lists/mappings."""

_KEY = "_vd_interp"
_ABSENT = "<absent>"


@dataclass
class Binding:
    """A value written with `${...}`, kept so that it can be evaluated over the merged configuration."""

    path: str
    """Dotted path of the field (or mapping key) it sets, from the root object."""
    raw: Any
    """The value as written (a string, or a list / mapping holding such strings)."""
    source: str
    """Where it was written ("file run.yaml:4", "CLI 'train.eval_iters=${train.train_iters}'")."""
    expect: str
    """The provenance its field shows while it still holds this binding's value."""


class _Unresolvable(Exception):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def has_interpolation(raw: Any) -> bool:
    """Whether a value as written (YAML data, a parsed override) holds a `${...}` anywhere."""
    if isinstance(raw, str):
        return "${" in raw
    if isinstance(raw, list | tuple):
        return any(has_interpolation(v) for v in raw)
    if isinstance(raw, dict):
        return any(has_interpolation(v) for v in raw.values())
    return False


def record(root: ConfigBase, ctx: DecodeContext) -> None:
    """Keep what `ctx` left unresolved as bindings on `root` (a later one replaces an earlier one)."""
    if not ctx.interpolations:
        return
    store = root.__dict__.setdefault(_KEY, {})
    for path, raw in ctx.interpolations:
        owner = _owner(root, path)
        # Only values that were stored: a value coerced just to compare, or under a key that was
        # refused, is not a binding.
        if owner is None or not _holds(root, path, raw):
            continue
        store[path] = Binding(path, raw, ctx.source_for(path), owner[0].source_of(owner[1]))
    ctx.interpolations.clear()


def resolve_interpolations(root: ConfigBase) -> None:
    """Evaluate every live binding of `root` over its current values; every problem in one `ConfigError`."""
    store = root.__dict__.get(_KEY)
    if not store:
        return
    active: dict[str, Binding] = {}
    for path, b in list(store.items()):
        owner = _owner(root, path)
        current = owner[0].source_of(owner[1]) if owner is not None else _ABSENT
        if current != b.expect:
            del store[path]  # assigned since: that value wins and the binding is over
            continue
        active[path] = b
    resolver = _Resolver(root, active)
    for path in active:
        resolver.apply(path)
    if resolver.problems:
        raise ConfigError(resolver.problems, header="cannot resolve ${...} interpolations")


# ----------------------------------------------------------------------------------------------


def _owner(root: ConfigBase, path: str) -> tuple[ConfigBase, str] | None:
    """(config object, field name) of the field that holds `path` (a field, or a key inside one)."""
    from viaduct.config.base import ConfigBase

    obj: Any = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(obj, ConfigBase) or part.startswith("_") or part not in type(obj).spec().fields:
            return None
        value = obj.__dict__.get(part)
        if isinstance(value, ConfigBase) and i < len(parts) - 1:
            obj = value
            continue
        return obj, part
    return None


def _holds(root: ConfigBase, path: str, raw: Any) -> bool:
    try:
        value = _read(root, path.split("."))
    except _Unresolvable:
        return False
    return value is raw or _plain(value) == _plain(raw)


def _plain(value: Any) -> Any:
    """Lists for tuples, all the way down: a tuple field stores the list it was given as a tuple."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read(root: ConfigBase, parts: list[str]) -> Any:
    from viaduct.config.base import ConfigBase

    obj: Any = root
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the root"
        if isinstance(obj, ConfigBase):
            if part.startswith("_") or part not in type(obj).spec().fields:
                hint = did_you_mean(part, type(obj).spec().public_names())
                raise _Unresolvable(
                    f"{type(obj).__name__} at {where} has no field {part!r}", fix=hint or None
                )
            obj = obj.__dict__.get(part)
        elif isinstance(obj, dict):
            if part not in obj:
                raise _Unresolvable(f"the mapping at {where} has no key {part!r}")
            obj = obj[part]
        elif isinstance(obj, list | tuple) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(obj) <= index < len(obj):
                raise _Unresolvable(f"the list at {where} has no item {index}")
            obj = obj[index]
        else:
            raise _Unresolvable(f"{where} is {_kind(obj)}, which has no {part!r}")
    return obj


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _pieces(text: str) -> list[str | tuple[str]]:
    """Literal text and `(reference,)` items of a string; `\\${` is a literal `${`."""
    out: list[str | tuple[str]] = []
    buf: list[str] = []
    i = 0
    while True:
        j = text.find("${", i)
        if j < 0:
            buf.append(text[i:])
            break
        if j > 0 and text[j - 1] == "\\":
            buf.append(text[i : j - 1] + "${")
            i = j + 2
            continue
        buf.append(text[i:j])
        end = text.find("}", j + 2)
        if end < 0:
            raise _Unresolvable(f"unterminated ${{ in {text[:80]!r}", fix="close it with }")
        ref = text[j + 2 : end]
        if "${" in ref:
            raise _Unresolvable("nested interpolations (${a.${b}}) are not supported")
        literal = "".join(buf)
        if literal:
            out.append(literal)
        buf = []
        out.append((ref.strip(),))
        i = end + 1
    literal = "".join(buf)
    if literal:
        out.append(literal)
    return out


def _as_text(value: Any, ref: str) -> str:
    from viaduct.config.types import function_path

    if isinstance(value, str):
        return value
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool | int | float) or value is None:
        return str(value)
    if isinstance(value, list | tuple | dict | set | frozenset):
        raise _Unresolvable(
            f"${{{ref}}} is {_kind(value)} and cannot be part of a text",
            fix=f"use ${{{ref}}} as the whole value",
        )
    if callable(value) and not isinstance(value, type):
        return function_path(value) or repr(value)
    return str(value)


def _size(value: Any, limit: int) -> int:
    """Characters plus items of `value`, counted up to just past `limit`."""
    total, todo = 0, [value]
    while todo and total <= limit:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += 1 + len(v)
            todo.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            total += 1 + len(v)
            todo.extend(v)
        else:
            total += 1
    return total


class _Resolver:
    def __init__(self, root: ConfigBase, active: dict[str, Binding]):
        self.root = root
        self.active = active
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.stack: list[str] = []
        self.left = MAX_TOTAL
        self.problems: list[Problem] = []

    def apply(self, path: str) -> None:
        from viaduct.config.codec import CoerceError, DecodeContext
        from viaduct.config.overrides import _apply_path

        if path in self.done:
            return
        if path in self.stack:
            cycle = " -> ".join([*self.stack[self.stack.index(path) :], path])
            raise _Unresolvable(f"interpolation cycle: {cycle}", fix="make one of them a value")
        b = self.active[path]
        self.stack.append(path)
        try:
            value = self._substitute(b.raw, b)
            ctx = DecodeContext(source=b.source, defer=False)
            _apply_path(self.root, path.split("."), "++", value, None, ctx)
            self.problems.extend(ctx.problems)
            if ctx.problems:
                self.failed.add(path)
        except _Unresolvable as exc:
            self.failed.add(path)
            self.problems.append(Problem(path, exc.message, _short(b.raw), exc.fix, b.source))
        except CoerceError as exc:
            self.failed.add(path)
            self.problems.append(Problem(path, exc.message, _short(b.raw), exc.fix, b.source))
        finally:
            self.stack.pop()
            self.done.add(path)
        owner = _owner(self.root, path)
        if owner is not None:
            b.expect = owner[0].source_of(owner[1])

    def _substitute(self, raw: Any, b: Binding) -> Any:
        if isinstance(raw, list | tuple):
            return [self._substitute(v, b) for v in raw]
        if isinstance(raw, dict):
            return {k: self._substitute(v, b) for k, v in raw.items()}
        if not isinstance(raw, str) or "${" not in raw:
            return raw
        pieces = _pieces(raw)
        if len(pieces) == 1 and isinstance(pieces[0], tuple):
            value = self._lookup(pieces[0][0], b)
            self._spend(_size(value, self.left))
            # A list or mapping is copied: two fields must not share one mutable object.
            return copy.deepcopy(value) if isinstance(value, list | dict | set) else value
        parts = [p if isinstance(p, str) else _as_text(self._lookup(p[0], b), p[0]) for p in pieces]
        length = sum(len(p) for p in parts)
        if length > MAX_TEXT:
            raise _Unresolvable(
                f"the interpolated text would be {length:,} characters; at most {MAX_TEXT:,} are allowed",
                fix="shorten the values it repeats",
            )
        self._spend(length)
        return "".join(parts)

    def _spend(self, amount: int) -> None:
        self.left -= amount
        if self.left < 0:
            raise _Unresolvable(
                f"interpolations expand to more than {MAX_TOTAL:,} characters and items in all",
                fix="reference fewer or shorter values",
            )

    def _lookup(self, ref: str, b: Binding) -> Any:
        from viaduct.config.base import ConfigBase

        if not ref:
            raise _Unresolvable("empty ${}", fix="write ${a.b}, the dotted path of a value")
        if ":" in ref:
            raise _Unresolvable(
                f"${{{ref}}}: resolvers are not supported", fix="write the value, or ${a.b} to refer to one"
            )
        dots = len(ref) - len(ref.lstrip("."))
        rest = [p for p in ref[dots:].replace("[", ".").replace("]", "").split(".") if p]
        if dots:
            here = b.path.split(".")
            if dots > len(here):
                raise _Unresolvable(f"${{{ref}}} goes above the root", fix="use fewer leading dots")
            parts = here[: len(here) - dots] + rest
        else:
            parts = rest
        target = ".".join(parts)
        try:
            whole = _read(self.root, parts)
        except _Unresolvable:  # may exist once a binding has set it (a component it creates)
            whole = None
        if isinstance(whole, ConfigBase):
            raise _Unresolvable(
                f"${{{ref}}} is a whole {type(whole).__name__}; an interpolation takes one value",
                fix="refer to one of its fields",
            )
        # Whatever binding sets the value read (or a value inside it, or around it) goes first.
        for other in self.active:
            if other == target or other.startswith(target + ".") or target.startswith(other + "."):
                if other in self.stack or other not in self.done:
                    self.apply(other)
                if other in self.failed:
                    raise _Unresolvable(f"${{{ref}}} refers to {other}, which could not be resolved")
        value = _read(self.root, parts)
        if isinstance(value, ConfigBase):
            raise _Unresolvable(
                f"${{{ref}}} is a whole {type(value).__name__}; an interpolation takes one value",
                fix="refer to one of its fields",
            )
        return value


def _short(raw: Any) -> Any:
    return raw if not isinstance(raw, str) or len(raw) <= 200 else raw[:197] + "..."
