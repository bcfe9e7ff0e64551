"""Asynchronous checkpoint saving (`checkpoint.async_save`): write in a background thread.

The tensors are staged in host memory first (`viaduct.training.checkpoint.staging`) and the rest
of the state deep-copied (`snapshot`): that is the only part of an async save that blocks the
training loop; once it returns, training may change its tensors freely.

`AsyncWriter` runs one write at a time in a background thread. Waiting for it (`wait()`, done by
the next save and by `Checkpointer.finalize`) re-raises an error the write hit, so a failed save is
never lost silently.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AsyncWriter", "snapshot"]


def snapshot(obj: Any) -> Any:
    """A deep copy of `obj` whose tensors are detached CPU copies (training may change the original)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class AsyncWriter:
    """At most one background write at a time; its error is raised by the next `wait()`."""

    def __init__(self, name: str = "viaduct-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self.last_seconds: float | None = None
        """Duration of the last finished write (None before the first)."""

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, what: str, fn: Callable[[], None]) -> None:
        """Run `fn` in the background after waiting for (and raising the error of) the previous write."""
        self.wait()
        self._what = what

        def run() -> None:
            t0 = time.perf_counter()
            try:
                fn()
            except BaseException as exc:  # kept for wait(): a thread's exception would only be printed
                self._error = exc
            finally:
                self.last_seconds = time.perf_counter() - t0

        # A daemon thread: a write stuck on a dead peer must not keep a failed process alive forever.
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Block until the write in flight (if any) is done; returns the seconds spent waiting.

        Raises `RuntimeError` (from the original error) if that write failed; the error is raised once.
        A `ValueError` (a user-facing error that already says what happened, such as a full disk) is
        raised as it is.
        """
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - t0
        error, self._error = self._error, None
        if isinstance(error, ValueError):
            raise error
        if error is not None:
            raise RuntimeError(
                f"asynchronous {self._what} failed: {type(error).__name__}: {error}"
            ) from error
        return waited
