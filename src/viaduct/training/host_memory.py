"""Keep freed host memory in the process while a CPU run trains (glibc's malloc only).

glibc hands every allocation over its mmap threshold (at most 32 MiB) its own fresh pages and gives
them back to the kernel when freed. A CPU training step allocates and frees the same large tensors
(logits, their log-probabilities and gradients, activations) every micro-batch, so each step pays
for tens of thousands of page faults on memory the kernel must zero first: 50,000 per step of the
embedded default, about 6% of its step time. With mmap off and no trimming, freed blocks stay in
the heap and the next step reuses them; the process keeps its peak memory, which the next step
needs anyway. The previous behaviour comes back when training ends, and the kept memory is
returned to the kernel then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("viaduct")

# mallopt parameters (malloc.h) and glibc's defaults for them.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536


def _glibc() -> ctypes.CDLL | None:
    """glibc, when it is this process's C library and the user has not tuned its malloc already."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return None  # the user's own malloc settings win
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None  # another allocator serves malloc: glibc's settings would change nothing
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def keep_freed_host_memory(enabled: bool = True) -> Iterator[bool]:
    """While inside, freed host memory stays in the process for reuse; yields whether that applies.

    A no-op (yielding False) when `enabled` is False, off glibc, or when the environment already sets
    malloc options (`GLIBC_TUNABLES`, `MALLOC_*`) or preloads another allocator.
    """
    libc = _glibc() if enabled else None
    if libc is None or not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
