"""Asynchronous checkpoint saving (`checkpoint.async_save`): stage to CPU memory, write in a thread.

`StagingBuffers` copies the model and optimizer tensors into CPU buffers (pinned when the tensors
live on a GPU, so the device-to-host copies run at full speed); the buffers are kept and reused by
the next save, so only the first save allocates. Staging is the only part of an async save that
blocks the training loop: once it returns, training may change its tensors freely.

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

__all__ = ["AsyncWriter", "StagingBuffers", "snapshot"]


def snapshot(obj: Any) -> Any:
    """A deep copy of `obj` whose tensors are detached CPU copies (training may change the original)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class StagingBuffers:
    """CPU copies of a flat dict of tensors, in buffers reused from one save to the next."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.allocated_bytes = 0
        """Bytes allocated by the last `stage()` call (0 once the structure repeats)."""

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy `tensors` into the buffers and return them under the same keys; returns after the copies
        are complete. A tensor under two keys (tied weights) is copied once into one buffer."""
        self.allocated_bytes = 0
        pin = torch.cuda.is_available() and any(t.device.type == "cuda" for t in tensors.values())
        staged: dict[str, torch.Tensor] = {}
        seen: dict[tuple[Any, ...], torch.Tensor] = {}
        used: set[str] = set()
        with torch.no_grad():
            for key, t in tensors.items():
                ident = _identity(t)
                if ident in seen:
                    staged[key] = seen[ident]
                    continue
                buf = self._buffers.get(key)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != pin:
                    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                    self._buffers[key] = buf
                    self.allocated_bytes += buf.numel() * buf.element_size()
                # non_blocking only helps device-to-pinned copies; the synchronize below completes them.
                buf.copy_(t.detach(), non_blocking=pin and t.device.type == "cuda")
                seen[ident] = staged[key] = buf
                used.add(key)
        if pin:
            torch.cuda.synchronize()
        for key in set(self._buffers) - used:  # the structure changed: free what is no longer staged
            del self._buffers[key]
        return staged

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    if t.device.type == "meta":
        return (id(t),)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


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
        """
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - t0
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(
                f"asynchronous {self._what} failed: {type(error).__name__}: {error}"
            ) from error
        return waited
