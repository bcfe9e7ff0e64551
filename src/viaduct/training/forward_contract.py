"""The forward-step contract between `pretrain()` and user code.

A forward step is `forward_step(data_iterator, model)` or `forward_step(state, data_iterator,
model)`; it returns `(output, loss_func)`, and `loss_func(output)` returns either

* `(loss, num_tokens, {name: tensor([sum, count]), ...})` — token-aware: `loss` is the *sum* of
  the per-token losses and the loop normalizes by `num_tokens` (or, with
  `model.calculate_per_token_loss`, by the global token count of the step); or
* `(loss, {name: value, ...})` — `loss` is already a mean for this micro-batch.

`state` is injected when a parameter is annotated `GlobalState` or the first one is named
`state` / `global_state` (checked once, with `inspect.signature`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from viaduct.training.state import GlobalState

LossFunc = Callable[[Any], tuple[Any, ...]]


class ForwardStepFunc(Protocol):
    """`(data_iterator, model) -> (output, loss_func)`, optionally with `state` first."""

    def __call__(self, data_iterator: Iterator[Any], model: torch.nn.Module) -> tuple[Any, LossFunc]: ...


def _wants_state(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    for p in params:
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            continue
        name = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
        if "GlobalState" in str(name):
            return True
    return bool(params) and params[0].name in ("state", "global_state")


def prepare_forward_step(fn: Callable[..., Any], state: GlobalState) -> ForwardStepFunc:
    """`fn` with `state` bound when it asks for it (the state object stays live)."""
    if not callable(fn):
        raise TypeError(f"forward_step_func must be callable, got {type(fn).__name__}")
    return functools.partial(fn, state) if _wants_state(fn) else fn


def unpack_loss(result: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(loss, num_tokens or None, report) from what a loss function returned; clear error otherwise."""
    if isinstance(result, tuple) and len(result) == 3:
        loss, num_tokens, report = result
    elif isinstance(result, tuple) and len(result) == 2:
        (loss, report), num_tokens = result, None
    else:
        raise TypeError(
            "loss_func must return (loss, num_tokens, {name: tensor([sum, count])}) "
            "or (loss, {name: value}); "
            f"got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        )
    if not isinstance(report, dict):
        raise TypeError(
            f"the last item returned by loss_func must be a dict of metrics, got {type(report).__name__}"
        )
    return loss, num_tokens, report
