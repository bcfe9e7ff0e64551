"""Training callbacks: user code run at fixed points of `pretrain()`.

Subclass `Callback` and override what you need, or pass plain functions in a dict
(`{"on_train_step_end": fn}`). Each hook gets a `CallbackContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from viaduct.training.state import GlobalState

if TYPE_CHECKING:
    from torch import nn

    from viaduct.training.optim import MixedPrecisionOptimizer
    from viaduct.training.scheduler import OptimizerParamScheduler

EVENTS = (
    "on_train_start",
    "on_train_step_start",
    "on_train_step_end",
    "on_train_end",
    "on_eval_start",
    "on_eval_end",
    "on_test_start",
    "on_test_end",
    "on_checkpoint_save",
)


@dataclass
class CallbackContext:
    """What a callback sees: the live state and the training objects."""

    state: GlobalState
    model: nn.Module | None = None
    """The model as trained: DDP-wrapped and/or compiled when the run does that, else the plain model."""
    optimizer: MixedPrecisionOptimizer | None = None
    scheduler: OptimizerParamScheduler | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Event-specific values: the step's losses (train step end), evaluation losses, checkpoint path."""

    @property
    def user_state(self) -> dict[str, Any]:
        return self.state.user_state


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, ctx: CallbackContext) -> None: ...
    def on_train_step_start(self, ctx: CallbackContext) -> None: ...
    def on_train_step_end(self, ctx: CallbackContext) -> None: ...
    def on_train_end(self, ctx: CallbackContext) -> None: ...
    def on_eval_start(self, ctx: CallbackContext) -> None: ...
    def on_eval_end(self, ctx: CallbackContext) -> None: ...
    def on_test_start(self, ctx: CallbackContext) -> None: ...
    def on_test_end(self, ctx: CallbackContext) -> None: ...
    def on_checkpoint_save(self, ctx: CallbackContext) -> None: ...


class CallbackManager:
    """Runs the hooks of several callbacks in order."""

    def __init__(
        self, callbacks: Iterable[Callback | Mapping[str, Callable[..., Any]]] | None = None
    ) -> None:
        self.callbacks: list[Callback | Mapping[str, Callable[..., Any]]] = []
        for cb in callbacks or ():
            if isinstance(cb, Mapping):
                unknown = sorted(set(cb) - set(EVENTS))
                if unknown:
                    raise ValueError(f"unknown callback events {unknown}; known: {', '.join(EVENTS)}")
            elif not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback instances or dicts of functions, got {type(cb)}")
            self.callbacks.append(cb)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def fire(self, event: str, ctx: CallbackContext) -> None:
        for cb in self.callbacks:
            fn = cb.get(event) if isinstance(cb, Mapping) else getattr(cb, event)
            if fn is not None:
                fn(ctx)
