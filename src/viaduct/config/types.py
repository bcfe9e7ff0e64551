"""Value types for configuration fields that name torch objects without importing torch.

Building, checking and saving a configuration must not pay for `import torch` (about a second on
a small CPU): the `viaduct config` commands answer in a fraction of that. So while torch is not
imported, a field that holds a dtype holds a `DType`, and a field that holds a function holds a
`FunctionRef`. Both compare equal to the torch object they name (`DType("bfloat16") ==
torch.bfloat16`) and turn into it on demand (`dtype.torch`, calling the ref).

Once torch is imported (by the user's code, or by training), there is nothing left to save: a
dtype field holds the `torch.dtype` itself and a function field the function itself
(`as_torch_object`), so `torch.zeros(2, dtype=cfg.model.params_dtype)` works and
`cfg.model.params_dtype is torch.bfloat16`. Saving, comparing and provenance treat both forms alike.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

# Every spelling users type for a dtype, mapped to torch's attribute name.
_DTYPE_ALIASES: dict[str, str] = {}
for _canonical, _names in {
    "float32": ["fp32", "float32", "float", "32", "32-true", "f32"],
    "float16": ["fp16", "float16", "half", "16", "16-mixed", "f16"],
    "bfloat16": ["bf16", "bfloat16", "bf16-mixed", "bf16-true"],
    "float64": ["fp64", "float64", "double", "64", "f64"],
    "float8_e4m3fn": ["fp8", "float8_e4m3fn", "e4m3"],
    "float8_e5m2": ["float8_e5m2", "e5m2"],
    "int8": ["int8"],
    "uint8": ["uint8"],
    "int16": ["int16"],
    "int32": ["int32", "int"],
    "int64": ["int64", "long"],
    "bool": ["bool"],
}.items():
    for _n in _names:
        _DTYPE_ALIASES[_n] = _canonical
        _DTYPE_ALIASES["torch." + _n] = _canonical


def dtype_names() -> list[str]:
    """The short spellings accepted for a dtype, for error messages."""
    return ["fp32", "bf16", "fp16", "fp64", "fp8", "float32", "bfloat16", "float16", "torch.bfloat16"]


class DType:
    """A torch dtype named by a config value, without importing torch.

    `DType("bf16")`, `DType("torch.bfloat16")` and `DType(torch.bfloat16)` are the same value.
    """

    __slots__ = ("name",)
    name: str

    def __init__(self, value: Any):
        name = self.canonical_name(value)
        if name is None:
            raise ValueError(
                f"{value!r} is not a dtype; use one of {', '.join(dtype_names())} (or torch.<dtype>)"
            )
        object.__setattr__(self, "name", name)

    @staticmethod
    def canonical_name(value: Any) -> str | None:
        """torch's attribute name for a dtype given in any accepted form, else None."""
        if isinstance(value, DType):
            return value.name
        if isinstance(value, str):
            return _DTYPE_ALIASES.get(value.strip().lower())
        if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
            return str(value).replace("torch.", "", 1)
        return None

    @property
    def torch(self) -> Any:
        """The `torch.dtype` object (imports torch)."""
        import torch

        return getattr(torch, self.name)

    @property
    def target(self) -> str:
        return "torch." + self.name

    @property
    def itemsize(self) -> int:
        return {
            "float64": 8,
            "int64": 8,
            "float32": 4,
            "int32": 4,
            "bfloat16": 2,
            "float16": 2,
            "int16": 2,
        }.get(self.name, 1)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("DType is immutable")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (DType, str)) or (
            type(other).__name__ == "dtype" and type(other).__module__ == "torch"
        ):
            return self.name == self.canonical_name(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("DType", self.name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __reduce__(self):
        return (DType, (self.name,))

    def __deepcopy__(self, memo: dict) -> DType:
        return self

    def __copy__(self) -> DType:
        return self


# Activation functions by the short names Megatron Bridge and Hugging Face configs use.
ACTIVATIONS: dict[str, str] = {
    "gelu": "torch.nn.functional.gelu",
    "relu": "torch.nn.functional.relu",
    "silu": "torch.nn.functional.silu",
    "swish": "torch.nn.functional.silu",
    "sigmoid": "torch.sigmoid",
    "tanh": "torch.tanh",
    "squared_relu": "viaduct.models.common.activations.squared_relu",
    "relu2": "viaduct.models.common.activations.squared_relu",
    "fast_gelu": "viaduct.models.common.activations.fast_gelu",
    "gelu_pytorch_tanh": "viaduct.models.common.activations.fast_gelu",
    "quick_gelu": "viaduct.models.common.activations.quick_gelu",
}

# Where torch's builtin functions really live (their __module__ is an internal one).
_KNOWN_FUNCTION_PATHS = {
    ("torch._C._nn", "gelu"): "torch.nn.functional.gelu",
    ("torch._C._nn", "silu"): "torch.nn.functional.silu",
    ("torch.nn.functional", "gelu"): "torch.nn.functional.gelu",
    ("torch", "sigmoid"): "torch.sigmoid",
    ("torch", "tanh"): "torch.tanh",
    ("torch._VariableFunctions", "sigmoid"): "torch.sigmoid",
    ("torch._VariableFunctions", "tanh"): "torch.tanh",
}


def function_path(fn: Any) -> str | None:
    """The importable dotted path of a named function or class, or None (lambdas, locals)."""
    if isinstance(fn, FunctionRef):
        return fn.path
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if module is None and type(fn).__name__ == "builtin_function_or_method":
        module = "torch"  # torch's C functions (torch.tanh) report no module
    if not module or not qualname or "<" in qualname:
        return None
    known = _KNOWN_FUNCTION_PATHS.get((module, qualname))
    if known:
        return known
    if module.startswith("torch"):
        # torch's C functions name internal modules (`torch._C._nn.softplus`); save the public
        # name they were allowed under, so that the file loads again.
        public = _public_torch_names().get(id(fn))
        if public:
            return public
    return f"{module}.{qualname}"


_torch_names: dict[int, str] = {}


def _public_torch_names() -> dict[int, str]:
    """id(function) -> its allowlisted public path, for the torch functions a config may name."""
    if not _torch_names and "torch" in sys.modules:
        from viaduct.config.targets import _SAFE_TORCH_FUNCTIONS

        # Internal aliases (`torch._C._nn.gelu`) first: the public spelling, written last, wins.
        for path in sorted(_SAFE_TORCH_FUNCTIONS, key=lambda p: ("._" in p, p), reverse=True):
            try:
                _torch_names[id(import_path(path))] = path
            except (ImportError, AttributeError):
                continue
    return _torch_names


def import_path(path: str) -> Any:
    """Import the longest importable module prefix of `path`, then getattr the rest."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = sys.modules.get(module_name) or importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {path!r}")


class FunctionRef:
    """A named function held by a config value; imported only when called or resolved.

    Callable like the function it names, equal to it, and saved to YAML by name.
    """

    __slots__ = ("_fn", "path")
    path: str
    _fn: Any

    def __init__(self, value: Any):
        if isinstance(value, FunctionRef):
            path = value.path
        elif isinstance(value, str):
            path = ACTIVATIONS.get(value.strip().lower(), value.strip())
        else:
            found = function_path(value)
            if found is None:
                raise ValueError(
                    f"{value!r} has no importable name (a lambda or a local function cannot be saved); "
                    "define it at module level"
                )
            path = found
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "_fn", None if isinstance(value, (str, FunctionRef)) else value)

    def resolve(self) -> Any:
        """The function itself (imports its module, through the function allowlist)."""
        fn = self._fn
        if fn is None:
            from viaduct.config.targets import resolve_function

            fn = resolve_function(self.path)
            object.__setattr__(self, "_fn", fn)
        return fn

    @property
    def short_name(self) -> str:
        for name, path in ACTIVATIONS.items():
            if path == self.path:
                return name
        return self.path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("FunctionRef is immutable")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FunctionRef):
            return self.path == other.path
        if isinstance(other, functools.partial):
            return NotImplemented
        if callable(other):
            return self.path == function_path(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("FunctionRef", self.path))

    def __repr__(self) -> str:
        return self.path

    def __reduce__(self):
        return (FunctionRef, (self.path,))

    def __deepcopy__(self, memo: dict) -> FunctionRef:
        return self


class Partial(functools.partial):
    """A `functools.partial` that compares by value, so configs holding one compare equal after loading."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, functools.partial):
            return NotImplemented
        return (
            (self.func == other.func or other.func == self.func)
            and self.args == other.args
            and (self.keywords == other.keywords)
        )

    def __hash__(self) -> int:
        return hash((Partial, repr(self.func), self.args))


def torch_dtype(value: Any) -> Any:
    """The `torch.dtype` a dtype field's value names, whichever form it has (imports torch)."""
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return value
    return DType(value).torch


def as_torch_object(value: Any) -> Any:
    """The torch dtype or function a `DType` / `FunctionRef` names, when torch is already imported.

    Anything else, and everything while torch is not imported, comes back unchanged: configuration
    work stays torch-free until something else has paid for the import. A function the allowlist
    refuses stays a `FunctionRef`, for `check_types()` to report with its field.
    """
    if "torch" not in sys.modules:
        return value
    if isinstance(value, DType):
        import torch

        # A dtype this torch build lacks (an fp8 type on an old build) stays named.
        return getattr(torch, value.name, value)
    if isinstance(value, FunctionRef):
        from viaduct.config.targets import TargetError, is_allowed_function

        if not is_allowed_function(value.path):
            return value
        try:
            return value.resolve()
        except (TargetError, ImportError, AttributeError):
            return value
    return value


def as_function(value: Any) -> Any:
    """The function a function field's value names, whichever form it has (a `FunctionRef` is
    resolved through the function allowlist; a function or partial is returned as it is)."""
    return value.resolve() if isinstance(value, FunctionRef) else value
