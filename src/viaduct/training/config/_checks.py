"""Small rule helpers shared by the `finalize()` methods of the training components.

Each helper adds at most one `Problem` whose path is relative to the component and whose fix names
the full dotted field (`train.train_iters`), using the class attribute `_component_` for the prefix.
None means "unset" and passes every check: required-ness is checked separately, where it applies.
"""

import os
from typing import ClassVar, Protocol

from viaduct.config import Problems
from viaduct.config.base import ClassSpec


class Component(Protocol):
    """A training component: a config whose fields the container holds under `_component_`."""

    _component_: ClassVar[str]

    @classmethod
    def spec(cls) -> ClassSpec: ...


def dotted(cfg: Component, name: str) -> str:
    """The full dotted path of field `name` of component `cfg` ("train.train_iters")."""
    return f"{cfg._component_}.{name}"


def _unset_hint(cfg: Component, name: str) -> str:
    info = type(cfg).spec().fields.get(name)
    return " or leave it unset" if info is not None and info.default is None else ""


def positive(p: Problems, cfg: Component, name: str, *, zero_ok: bool = False) -> None:
    """`cfg.name` must be > 0 (>= 0 with `zero_ok`) when it is set."""
    value = getattr(cfg, name)
    if value is None:
        return
    if value < 0 or (value == 0 and not zero_ok):
        rule, want = ("must be >= 0", "0 or more") if zero_ok else ("must be > 0", "a positive value")
        p.add(name, rule, value, fix=f"set {dotted(cfg, name)} to {want}{_unset_hint(cfg, name)}")


def in_range(p: Problems, cfg: Component, name: str, lo: float, hi: float, *, hi_open: bool = False) -> None:
    """`cfg.name` must lie in [lo, hi] ([lo, hi) with `hi_open`) when it is set."""
    value = getattr(cfg, name)
    if value is None:
        return
    if value < lo or value > hi or (hi_open and value == hi):
        interval = f"[{lo}, {hi}{')' if hi_open else ']'}"
        p.add(
            name,
            f"must be in {interval}",
            value,
            fix=f"set {dotted(cfg, name)} to a value in {interval}{_unset_hint(cfg, name)}",
        )


def path_exists(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def file_must_exist(p: Problems, cfg: Component, name: str, what: str) -> None:
    """`cfg.name`, when set, must name an existing file or directory."""
    value = getattr(cfg, name)
    if value is not None and not path_exists(value):
        p.add(name, f"{what} does not exist", value, fix=f"check the path in {dotted(cfg, name)}")
