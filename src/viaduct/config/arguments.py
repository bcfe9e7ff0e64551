"""argparse flags generated from a config tree: `--train.train-iters 10`, `--no-train.manual-gc`.

Help text comes from the field docstrings, `Literal` and `Enum` fields get `choices`, booleans get
`--x` / `--no-x`. Parsed flags are applied through the same coercion as overrides, so
`--model.params-dtype bf16` and `--optimizer.lr 1e-4` mean what they say.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from viaduct.config import typing_utils as tu
from viaduct.config.base import ConfigBase
from viaduct.config.docstrings import field_docstrings
from viaduct.config.errors import ConfigError, Problem
from viaduct.config.overrides import _apply_one, config_type_in

_DEST_PREFIX = "cfg:"


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def _iter_fields(obj: ConfigBase | type[ConfigBase], prefix: str) -> Iterator[tuple[str, Any, str, Any]]:
    cls = obj if isinstance(obj, type) else type(obj)
    docs = field_docstrings(cls)
    for name, info in cls.spec().fields.items():
        if name.startswith("_") or info.derived:
            continue
        path = f"{prefix}.{name}" if prefix else name
        value = None if isinstance(obj, type) else obj.__dict__.get(name)
        sub_cls = config_type_in(info.type)
        if isinstance(value, ConfigBase):
            yield from _iter_fields(value, path)
        elif sub_cls is not None and not sub_cls._abstract_config_ and not isinstance(value, str):
            yield from _iter_fields(sub_cls, path)  # an unset optional component: flags create it
        elif sub_cls is None:
            yield path, info.type, docs.get(name, ""), value


def add_config_arguments(parser: argparse.ArgumentParser, cfg: ConfigBase) -> None:
    """Add one flag per field of `cfg` (recursively) to `parser`, grouped by component."""
    groups: dict[str, Any] = {}
    for path, tp, doc, _value in _iter_fields(cfg, ""):
        top = path.split(".", 1)[0] if "." in path else "config"
        group = groups.get(top)
        if group is None:
            group = groups[top] = parser.add_argument_group(f"{top} options")
        dest = _DEST_PREFIX + path
        help_text = doc or None
        inner = tu.strip_optional(tp)
        if inner is bool:
            group.add_argument(
                _flag(path),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        kwargs: dict[str, Any] = {
            "dest": dest,
            "default": argparse.SUPPRESS,
            "help": help_text,
            "metavar": tu.type_name(inner).upper() if not tu.is_literal(inner) else None,
        }
        if tu.is_literal(inner):
            kwargs["choices"] = [str(c) for c in tu.args(inner)]
        elif tu.is_enum_type(inner):
            kwargs["choices"] = [m.name for m in inner]
            kwargs["metavar"] = None
        elif tu.origin(inner) in (list, tuple, set, frozenset):
            kwargs["nargs"] = "*"
        group.add_argument(_flag(path), **kwargs)


def apply_parsed_args(cfg: ConfigBase, namespace: argparse.Namespace) -> ConfigBase:
    """Apply every flag the user gave (in `namespace`) to `cfg` in place; all problems at once."""
    problems: list[Problem] = []
    for dest, value in vars(namespace).items():
        if not dest.startswith(_DEST_PREFIX):
            continue
        path = dest[len(_DEST_PREFIX) :]
        if isinstance(value, list):
            text = "[" + ", ".join(value) + "]"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = value
        problems.extend(_apply_one(cfg, f"{path}={text}", "CLI flag"))
    if problems:
        raise ConfigError(problems, header="invalid command-line flags")
    return cfg


def has_config_flags(args: list[str]) -> bool:
    """Whether any of `args` looks like a generated config flag (`--train.train-iters`)."""
    return any(a.startswith("--") and "." in a.split("=", 1)[0] for a in args)
