"""Small config classes that exercise every kind of field the machinery supports."""

import enum
import functools
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from viaduct.config import ConfigBase, DType, FunctionRef, Problems, derived, unsupported


class Color(enum.Enum):
    red = 1
    green = 2


@dataclass(kw_only=True)
class Inner(ConfigBase):
    """A component."""

    iters: int | None = None
    """How many iterations."""
    lr: float = 1e-3
    """Learning rate."""
    style: Literal["linear", "cosine"] = "linear"
    """Decay style."""
    flag: bool = False
    """A switch."""
    steps: int | None = derived()
    """Derived: iters x 10."""

    def finalize(self) -> None:
        p = Problems()
        if self.iters is not None and self.iters <= 0:
            p.add("iters", "must be > 0", self.iters, fix="set inner.iters to a positive number")
        if self.lr < 0:
            p.add("lr", "must be >= 0", self.lr, fix="set inner.lr >= 0")
        p.raise_if_any()
        if self.iters is not None:
            self.derive("steps", self.iters * 10, "iters x 10")


@dataclass(kw_only=True)
class Plugin(ConfigBase):
    """Abstract base with two kinds."""

    _abstract_config_ = True
    rank: int = 8
    """Rank."""


@dataclass(kw_only=True)
class PluginA(Plugin):
    """Kind A."""

    _aliases_ = ("a",)
    alpha: float = 1.0
    """Alpha."""


@dataclass(kw_only=True)
class PluginB(Plugin):
    """Kind B."""

    _aliases_ = ("b",)
    beta: int = 2
    """Beta."""


@dataclass(kw_only=True)
class Everything(ConfigBase):
    """A root holding every supported value kind."""

    inner: Inner
    """Required component."""
    optional: Inner | None = None
    """Optional component."""
    plugin: Plugin | None = None
    """Union of kinds via a shared base."""
    dtype: DType = DType("float32")
    """A dtype."""
    act: FunctionRef = FunctionRef("gelu")
    """A function."""
    color: Color = Color.red
    """An enum."""
    sig: signal.Signals = signal.SIGTERM
    """A stdlib enum."""
    window: tuple[int, int] | None = None
    """A fixed tuple."""
    path: Path | None = None
    """A path."""
    names: list[str] = field(default_factory=list)
    """A list."""
    table: dict[str, Any] = field(default_factory=dict)
    """Anything goes."""
    init: Any = None
    """A partial or anything."""
    fp8: str | None = unsupported("FP8 training")
    """Not built yet."""


def everything_full() -> Everything:
    return Everything(
        inner=Inner(iters=3, lr=0.5, style="cosine", flag=True),
        optional=Inner(iters=1),
        plugin=PluginB(beta=5),
        dtype=DType("bf16"),
        act=FunctionRef("silu"),
        color=Color.green,
        sig=signal.SIGINT,
        window=(128, 0),
        path=Path("/data/x"),
        names=["a", "b"],
        table={"t": (1, 2), "p": Path("rel/p"), "n": None, "nested": {"l": [1, 2.5, "x"]}, "s": {3, 4}},
        init=functools.partial(FunctionRef("torch.nn.init.normal_"), mean=0.0, std=0.02),
    )
