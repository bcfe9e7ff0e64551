"""Graceful exit on a signal (SIGTERM from Slurm or Kubernetes before the job is killed).

The handler only *records* that the signal arrived: doing work inside a signal handler (saving a
checkpoint, collective calls) is unsafe, because the handler runs between two arbitrary Python
bytecodes of the main thread. The training loop polls `any_rank_received(handler, group)` at a step
boundary, and every rank takes the same decision (save, then exit), since one rank alone cannot save
a sharded checkpoint.

Importing this module does not import torch; only `any_rank_received` needs it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DistributedSignalHandler", "any_rank_received", "worker_ignore_signal"]

# What signal.getsignal() can return: a callable, SIG_DFL/SIG_IGN, or None (set from C code).
_Handler = Any


class DistributedSignalHandler:
    """Records the arrival of one signal in this process; restores the previous handler on release.

    Use as a context manager around the training loop::

        with DistributedSignalHandler(signal.SIGTERM) as handler:
            for step in ...:
                ...
                if any_rank_received(handler, gloo_group):
                    save_checkpoint(); break

    `install()`/`release()` do the same for code that cannot nest a `with` block. Both are idempotent.
    Installing works only in the main thread (a Python rule for `signal.signal`).
    """

    def __init__(self, sig: int | signal.Signals = signal.SIGTERM) -> None:
        self.sig = signal.Signals(sig)
        self._count = 0
        self._previous: _Handler = None
        self._installed = False

    # -- installation -------------------------------------------------------------------------
    def install(self) -> DistributedSignalHandler:
        """Start recording the signal (again clears what an earlier installation recorded)."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"DistributedSignalHandler({self.sig.name}) must be installed from the main thread "
                "(Python delivers signals only there)"
            )
        self._count = 0
        self._previous = signal.getsignal(self.sig)
        signal.signal(self.sig, self._on_signal)
        self._installed = True
        return self

    def release(self) -> bool:
        """Restore the handler that was there before `install()`; False when nothing was installed."""
        if not self._installed:
            return False
        # None means the previous handler was set from C and cannot be restored from Python;
        # the default action is the closest safe choice.
        signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False
        return True

    def __enter__(self) -> DistributedSignalHandler:
        return self.install()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a counter increment: safe at any point of the interrupted code.
        self._count += 1

    # -- queries ------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def count(self) -> int:
        """How many times the signal arrived since `install()`."""
        return self._count

    def received(self) -> bool:
        """Whether this process got the signal since `install()` (host only, no communication)."""
        return self._count > 0

    def __repr__(self) -> str:
        state = "installed" if self._installed else "released"
        return f"DistributedSignalHandler({self.sig.name}, {state}, received={self.received()})"


def any_rank_received(handler: DistributedSignalHandler, group: ProcessGroup | None = None) -> bool:
    """Whether any rank of `group` got the signal; every rank gets the same answer.

    A collective: all ranks of `group` must call it at the same point. Pass a gloo group so that
    the all-reduce runs on the host without a device synchronisation; with an NCCL group the flag
    goes through the current CUDA device and the `.item()` waits for the GPU to drain.
    Without an initialized process group this is just `handler.received()`.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return handler.received()
    flag = torch.tensor([1 if handler.received() else 0], dtype=torch.int32)
    if dist.get_backend(group) == "nccl":
        flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def worker_ignore_signal(sig: int | signal.Signals, worker_id: int | None = None) -> None:
    """Ignore `sig` in the calling process; use as a DataLoader `worker_init_fn`.

    `functools.partial(worker_ignore_signal, signal.SIGTERM)` fits `worker_init_fn` (it is called
    with the worker id). Slurm sends SIGTERM to every process of the job: without this, the data
    workers die at once and the main process fails on a dead worker before it can save its
    checkpoint; with it, the workers live until the main process shuts the DataLoader down.
    """
    signal.signal(signal.Signals(sig), signal.SIG_IGN)
