"""CPU staging of checkpoint tensors: one arena of host memory, carved into views, reused between saves.

A save first copies the model and optimizer tensors it writes into host memory; the files are then
written from there, on the caller's thread (synchronous save) or in the background (`async_save`),
while training may already change the originals.

Why one arena, and not `torch.empty(..., pin_memory=True)` per tensor: torch's pinned allocator rounds
every block up to a power of two and pins pages on one thread. For the 17.3 GB state of a 1B model
(bf16 weights, fp32 masters, Adam moments) on an H200 host that took 6.0 s as 490 blocks and 11.3 s
(and 32 GB) as one. Ordinary memory, its pages faulted in by torch's threads (0.6-1.4 s) and then
registered with CUDA (`cudaHostRegister`, 0.6-1.1 s in pieces), took 1.5-2.1 s on H100 and H200
hosts, and device-to-host copies into it run at full speed (0.31 s).

`prepare(tensors, background=True)` builds the arena in a thread: the training loop starts it after
its first step (when the optimizer state exists), so the first save does not pay for it.
`stage(tensors)` waits for that if still running, checks that the tensors still have the layout the
arena was built for (else builds a new one), copies, and returns views keyed like `tensors`.

A sharded (DTensor) tensor stages only this rank's shard; what `stage` returns for it is a DTensor
of the same mesh, placements and global shape over the host copy, which is what DCP writes from.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["StagingArena", "StagingMemoryError"]

log = logging.getLogger("viaduct")

_ALIGN = 64  # bytes: every view starts on a cache line (and on any dtype's alignment)
_REGISTER_CHUNK = 256 << 20
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context of the process, not just the current one


class StagingMemoryError(MemoryError):
    """The host does not have the memory to stage a save."""


def _available_host_memory() -> int | None:
    """Linux's estimate of the memory available without swapping (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class _Slot:
    keys: tuple[str, ...]  # one tensor may sit under several keys (tied weights)
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _Layout:
    slots: tuple[_Slot, ...]
    size: int
    pin: bool
    device: Any  # the CUDA device the pinned registration is made from (None: not pinned)

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> _Layout:
        order: list[tuple[Any, ...]] = []
        keys: dict[tuple[Any, ...], list[str]] = {}
        first: dict[tuple[Any, ...], torch.Tensor] = {}
        for key, t in tensors.items():
            t = _local(t)
            ident = _identity(t)
            if ident not in keys:
                order.append(ident)
                keys[ident], first[ident] = [], t
            keys[ident].append(key)
        slots, offset = [], 0
        for ident in order:
            t = first[ident]
            nbytes = t.numel() * t.element_size()
            slots.append(_Slot(tuple(keys[ident]), tuple(t.shape), t.dtype, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        cuda = [_local(t).device for t in tensors.values() if _local(t).device.type == "cuda"]
        pin = bool(cuda) and torch.cuda.is_available()
        return cls(tuple(slots), offset, pin, cuda[0] if pin else None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _like(original: torch.Tensor, staged: torch.Tensor) -> torch.Tensor:
    """`staged` (a host copy of this rank's part of `original`) as `original` is laid out: a DTensor
    of the same mesh, placements and global shape when `original` is one. Built from its spec rather
    than with `DTensor.from_local`, which would move the host copy back to the mesh's device."""
    if not isinstance(original, DTensor):
        return staged
    return DTensor(staged, original._spec, requires_grad=False)


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    if t.device.type == "meta":
        return (id(t),)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class StagingArena:
    """Host memory for the tensors of a save, kept and reused while their layout repeats."""

    def __init__(self, *, verbose: bool = True) -> None:
        self.verbose = verbose  # log when the memory is ready (rank 0 only, in a distributed run)
        self._layout: _Layout | None = None
        self._arena: torch.Tensor | None = None
        self._registered: list[int] = []  # start addresses of the pinned pieces
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.allocated_bytes = 0
        """Bytes the last `stage()` had to allocate itself (0 when prepared beforehand or reused)."""
        self.build_seconds: float | None = None
        """How long building the current arena took (faulting pages in and pinning them)."""
        self.waited_seconds = 0.0
        """How long the last `stage()` waited for a background `prepare()`."""

    @property
    def nbytes(self) -> int:
        return 0 if self._arena is None else self._arena.numel()

    @property
    def pinned(self) -> bool:
        return bool(self._registered)

    def prepare(self, tensors: dict[str, torch.Tensor], *, background: bool = False) -> None:
        """Build the arena for `tensors`' layout now, or in a background thread (one at a time)."""
        layout = _Layout.of(tensors)
        self._join()
        if layout == self._layout:
            return
        if not background:
            self._build(layout)
            return
        self._thread = threading.Thread(
            target=self._build_catching, args=(layout,), name="viaduct-checkpoint-staging", daemon=True
        )
        self._thread.start()

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy `tensors` into the arena; returns once the copies are complete."""
        t0 = time.perf_counter()
        self._join()
        self.waited_seconds = time.perf_counter() - t0
        self.allocated_bytes = 0
        layout = _Layout.of(tensors)
        if layout != self._layout:
            self._build(layout)
            self.allocated_bytes = layout.size
        assert self._arena is not None
        staged: dict[str, torch.Tensor] = {}
        non_blocking = self.pinned
        with torch.no_grad():
            for slot in layout.slots:
                view = self._arena[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
                src = _local(tensors[slot.keys[0]]).detach()
                # non_blocking only helps device-to-pinned copies; the synchronize below completes them.
                view.copy_(src, non_blocking=non_blocking and src.device.type == "cuda")
                for key in slot.keys:
                    staged[key] = _like(tensors[key], view)
        if non_blocking:
            torch.cuda.synchronize(layout.device)
        return staged

    def release(self) -> None:
        """Free the arena (after any background preparation finishes)."""
        self._join()
        with self._lock:
            self._drop()

    # ------------------------------------------------------------------------------------ internals

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _build_catching(self, layout: _Layout) -> None:
        try:
            self._build(layout)
        except Exception as exc:  # said at once (a thread's exception would only be printed)
            # Preparing is an optimisation: the next save builds the arena itself, or reports why not.
            log.warning("preparing the checkpoint staging memory failed: %s", exc)

    def _build(self, layout: _Layout) -> None:
        with self._lock:
            self._drop()
            t0 = time.perf_counter()
            # Checked first: past it, faulting the pages in would wake the kernel's OOM killer rather
            # than raise an error.
            available = _available_host_memory()
            if available is not None and layout.size > 0.9 * available:
                raise StagingMemoryError(
                    f"staging needs {layout.size / 1e9:.2f} GB of host memory and "
                    f"{available / 1e9:.2f} GB are available"
                )
            try:
                arena = torch.empty(max(layout.size, 1), dtype=torch.uint8)
            except RuntimeError as exc:
                raise StagingMemoryError(
                    f"could not allocate {layout.size / 1e9:.2f} GB of host memory for staging: {exc}"
                ) from exc
            # Fault every page in first (torch fills with several threads): registering untouched memory
            # leaves the kernel to do it on one thread (4.1 s instead of 1.1 s for 17.3 GB).
            arena.zero_()
            t1 = time.perf_counter()
            self._arena, self._layout = arena, layout
            if layout.pin:
                self._register(layout)
            t2 = time.perf_counter()
            self.build_seconds = t2 - t0
            if self.verbose:
                log.info(
                    "checkpoint staging memory ready: %.3f GB in %.2f s (pages %.2f s, pinning %.2f s)",
                    layout.size / 1e9,
                    t2 - t0,
                    t1 - t0,
                    t2 - t1,
                )

    def _register(self, layout: _Layout) -> None:
        """Pin the arena in pieces of whole tensors (no view spans two registrations).

        The driver holds a lock while it registers memory, so one 17 GB call stalled the training
        loop's kernel launches for 1.3 s; pieces of `_REGISTER_CHUNK` bytes stall it for milliseconds.
        """
        assert self._arena is not None
        base = self._arena.data_ptr()
        pieces: list[tuple[int, int]] = []
        start = end = 0
        for slot in layout.slots:
            if end > start and slot.offset + slot.nbytes - start > _REGISTER_CHUNK:
                pieces.append((start, end - start))
                start = slot.offset
            end = slot.offset + slot.nbytes
        if end > start:
            pieces.append((start, end - start))
        cudart = torch.cuda.cudart()
        # In this thread the current device may not be the run's: register from the run's device so
        # that no context is created on another GPU.
        with torch.cuda.device(layout.device):
            for offset, size in pieces:
                rc = cudart.cudaHostRegister(base + offset, size, _CUDA_HOST_REGISTER_PORTABLE)
                if int(rc) != 0:
                    log.warning(
                        "could not pin %.2f GB of checkpoint staging memory (CUDA error %s): "
                        "copies to it will be slower",
                        self._arena.numel() / 1e9,
                        rc,
                    )
                    self._unregister()
                    return
                self._registered.append(base + offset)
                time.sleep(0.001)  # let a waiting training thread take the driver lock

    def _unregister(self) -> None:
        cudart = torch.cuda.cudart()
        for ptr in self._registered:
            cudart.cudaHostUnregister(ptr)
        self._registered = []

    def _drop(self) -> None:
        if self._registered:
            self._unregister()
        self._arena, self._layout = None, None

    def __del__(self) -> None:
        # Registered memory must be unregistered before the allocator reuses it.
        try:
            self._drop()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
