"""Safe resolution of `_target_` paths found in YAML files and overrides.

A configuration file must never be able to run code. A `_target_` is therefore checked *as a
string*, before anything is imported or called, against an allowlist:

* viaduct's own config classes and enums (and the functions viaduct registers, e.g. activations);
* torch dtypes and a fixed set of torch functions (activations, `torch.nn.init` initializers);
* `signal.Signals`, `pathlib.Path`, `builtins.tuple`, `functools.partial`;
* whatever the user registers with `register_target(...)` / `register_target_prefix(...)`.

Megatron Bridge / Megatron Core targets (`megatron.bridge.training.config.TrainingConfig` ...) are
mapped onto viaduct's classes of the same name, so their YAML files load; they are never imported.
"""

from __future__ import annotations

import importlib
import sys
from enum import Enum
from typing import Any, TypeVar

from viaduct.config.errors import did_you_mean
from viaduct.config.types import _DTYPE_ALIASES, ACTIVATIONS, import_path

# Exact non-viaduct targets that are safe: pure functions and value types.
_SAFE_TORCH_FUNCTIONS = (
    {
        "torch.nn.functional." + n
        for n in ("gelu", "relu", "silu", "sigmoid", "tanh", "softplus", "mish", "elu", "leaky_relu", "glu")
    }
    | {
        "torch.sigmoid",
        "torch.tanh",
        "torch._C._nn.gelu",  # how torch.nn.functional.gelu names itself
        "torch._C._nn.silu",
    }
    | {
        "torch.nn.init." + n
        for n in (
            "normal_",
            "uniform_",
            "zeros_",
            "ones_",
            "constant_",
            "xavier_normal_",
            "xavier_uniform_",
            "kaiming_normal_",
            "kaiming_uniform_",
            "trunc_normal_",
            "orthogonal_",
        )
    }
)
_SAFE_EXACT = {
    "signal.Signals",
    "pathlib.Path",
    "pathlib.PosixPath",
    "builtins.tuple",
    "builtins.set",
    "builtins.frozenset",
    "functools.partial",
}

_C = TypeVar("_C")

_user_targets: dict[str, Any] = {}
_user_prefixes: list[str] = []
# viaduct functions that may be named in YAML: its activations.
_viaduct_functions: set[str] = set(p for p in ACTIVATIONS.values() if p.startswith("viaduct."))

_MEGATRON_PREFIXES = ("megatron.bridge.", "megatron.core.", "megatron.training.", "nemo.")


class TargetError(ValueError):
    """A `_target_` that is refused or cannot be resolved."""


def register_target(obj: Any, name: str | None = None) -> Any:
    """Allow `obj` (a class, function or enum) to be named as a `_target_` in YAML files.

    Usable as a decorator. `name` defaults to the object's dotted import path.
    """
    from viaduct.config.types import function_path

    path = name or function_path(obj)
    if path is None:
        raise ValueError(f"{obj!r} has no importable name; pass name=...")
    _user_targets[path] = obj
    return obj


def register_target_prefix(prefix: str) -> None:
    """Allow every target under a module prefix ("mypkg.models."). Only for code you trust."""
    if not prefix or prefix in {"os.", "sys.", "builtins.", "subprocess.", "torch."}:
        raise ValueError(f"refusing to allow the whole prefix {prefix!r}")
    _user_prefixes.append(prefix if prefix.endswith(".") else prefix + ".")


def _megatron_class_name(path: str) -> str | None:
    """The class name a Megatron target maps to: every class viaduct mirrors keeps Megatron's name."""
    if path.startswith(_MEGATRON_PREFIXES):
        return path.rsplit(".", 1)[-1]
    return None


def _load_catalog() -> None:
    """Import the modules that define viaduct's config classes so the name registry is full."""
    for mod in (
        "viaduct.training.config",
        "viaduct.models",
        "viaduct.peft",
        "viaduct.training.mixed_precision",
        "viaduct.training.comm_overlap",
    ):
        importlib.import_module(mod)


def is_allowed(path: str) -> bool:
    """Whether `path` may be resolved at all (a pure string check: nothing is imported)."""
    if not isinstance(path, str) or not path or any(not part.isidentifier() for part in path.split(".")):
        return False
    if path in _user_targets or path in _SAFE_EXACT or path in _SAFE_TORCH_FUNCTIONS:
        return True
    from viaduct.config.base import config_class_by_target

    if config_class_by_target(path) is not None:
        return True
    if path.startswith("torch.") and path[6:] in _DTYPE_ALIASES.values():
        return True
    if any(path.startswith(p) for p in _user_prefixes):
        return True
    if _megatron_class_name(path) is not None:
        return True
    if path.startswith("viaduct."):
        # Only public names; a private segment could reach anything.
        return not any(part.startswith("_") for part in path.split("."))
    return False


def is_allowed_function(path: str) -> bool:
    """Whether a function field may name `path` (a pure string check: nothing is imported).

    Narrower than `is_allowed`: a function field is called on tensors, so it must name one of the
    functions on the list (torch activations and initializers, viaduct's registered activations,
    `register_target` names) or one under a `register_target_prefix` prefix, not any public name
    inside a viaduct module (`viaduct.cli.main.os.system` is public, and is `os.system`).
    """
    if not isinstance(path, str) or not path or any(not part.isidentifier() for part in path.split(".")):
        return False
    if path in _SAFE_TORCH_FUNCTIONS or path in _viaduct_functions:
        return True
    if path in _user_targets:
        return callable(_user_targets[path])
    return any(path.startswith(p) for p in _user_prefixes) and not any(
        part.startswith("_") for part in path.split(".")
    )


def function_problem(path: str) -> str | None:
    """Why a function field may not name `path`, or None when it may.

    Exact names on the allowlist are decided from the string; a name under a registered prefix is
    resolved (the user registered that package as code to import) to check where it leads.
    """
    if not is_allowed_function(path):
        return (
            f"{path!r} is not a known function (an activation name such as gelu, silu, relu, "
            "squared_relu or quick_gelu, a torch activation or init function, or a function "
            "registered with viaduct.config.register_target)"
        )
    if path in _SAFE_TORCH_FUNCTIONS or path in _viaduct_functions or path in _user_targets:
        return None
    try:
        resolve_function(path)
    except TargetError as exc:
        return str(exc)
    return None


def resolve_function(path: str) -> Any:
    """The function a function field names, after `is_allowed_function`.

    Under a registered prefix, the object reached must also be *defined* under one: a path can go
    through a module's imports (`mypkg.models.os.system`), so the name alone proves nothing.
    """
    from viaduct.config.types import function_path

    if not is_allowed_function(path):
        raise TargetError(
            f"{path!r} is not a known function: a function field takes an activation name (gelu, silu, "
            "relu, squared_relu, quick_gelu, ...), a torch activation or init function, or a function "
            "registered with viaduct.config.register_target"
        )
    if path in _user_targets:
        return _user_targets[path]
    try:
        fn = resolve_target(path)
    except (ImportError, AttributeError) as exc:
        raise TargetError(f"function {path!r} does not exist ({exc})") from None
    if not callable(fn) or isinstance(fn, type):
        raise TargetError(f"{path!r} is not a function")
    if path not in _SAFE_TORCH_FUNCTIONS and path not in _viaduct_functions:
        home = function_path(fn) or ""
        if not any(home.startswith(p) for p in _user_prefixes):
            raise TargetError(
                f"{path!r} is {home or type(fn).__name__}, defined outside the registered prefixes "
                f"({', '.join(_user_prefixes)})"
            )
    return fn


def resolve_target(path: str, *, expect: type | None = None) -> Any:
    """The object a `_target_` names, after the allowlist check.

    viaduct paths must name a config class, an enum or a registered function: importing our own
    modules has no side effects, and nothing is called here.
    """
    from viaduct.config.base import ConfigBase, config_class_by_name, config_class_by_target

    if not is_allowed(path):
        raise TargetError(
            f"_target_ {path!r} is not allowed: YAML may only name viaduct config classes and enums, "
            "torch dtypes and activation/init functions, and targets registered with "
            "viaduct.config.register_target"
        )
    if path in _user_targets:
        return _user_targets[path]
    known = config_class_by_target(path)
    if known is not None:
        return known
    mname = _megatron_class_name(path)
    if mname is not None:
        _load_catalog()
        cls = config_class_by_name(mname)
        if cls is None:
            enum_cls = _enum_by_name(mname)
            if enum_cls is not None:
                return enum_cls
            raise TargetError(f"_target_ {path!r} has no viaduct equivalent (no config class named {mname})")
        return cls
    if path.startswith("torch."):
        if path[6:] in _DTYPE_ALIASES.values():
            from viaduct.config.types import DType

            return DType(path)
        return import_path(path)
    if path in _SAFE_EXACT:
        return import_path(path)
    if any(path.startswith(p) for p in _user_prefixes):
        return import_path(path)
    # viaduct.*
    try:
        obj = import_path(path)
    except (ImportError, AttributeError) as exc:
        raise TargetError(f"_target_ {path!r} does not exist ({exc})") from None
    ok = (
        (isinstance(obj, type) and (issubclass(obj, ConfigBase) or issubclass(obj, Enum)))
        or path in _viaduct_functions
        or getattr(obj, "__viaduct_target__", False)
    )
    if not ok:
        raise TargetError(
            f"_target_ {path!r} is not allowed: only viaduct config classes, enums and registered "
            "functions may be named"
        )
    return obj


_ENUM_MODULES = ("viaduct.training.config", "viaduct.models")


def _enum_by_name(name: str) -> type[Enum] | None:
    for mod_name in _ENUM_MODULES:
        mod = sys.modules.get(mod_name) or importlib.import_module(mod_name)
        obj = getattr(mod, name, None)
        if isinstance(obj, type) and issubclass(obj, Enum):
            return obj
    return None


def config_class_for(path: str, base: type[_C]) -> type[_C]:
    """Resolve a `_target_` that must name a subclass of `base` (a config component)."""
    obj = resolve_target(path)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        from viaduct.config.base import ConfigBase

        known = [c.__name__ for c in _subclasses(base)] if issubclass(base, ConfigBase) else []
        hint = f"; expected one of: {', '.join(known)}" if known else ""
        raise TargetError(f"_target_ {path!r} is not a {base.__name__}{hint}")
    return obj


def _subclasses(base: type) -> list[type]:
    out, todo = [], [base]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def suggest_target(path: str) -> str:
    from viaduct.config.base import all_config_classes

    return did_you_mean(path.rsplit(".", 1)[-1], [c.__name__ for c in all_config_classes()])
