"""`load_weights_only(path)`: every `.pt` file of a checkpoint is read through here.

`torch.load(weights_only=True)` refuses every class outside its allowlist, but that list is
process-wide: any library imported beside viaduct may widen it (`torch.serialization.add_safe_globals`;
megatron-core, for one, adds `pathlib.PosixPath`, `argparse.Namespace`, `io.BytesIO` and NumPy's array
reconstruction when it is imported). A checkpoint is untrusted input, so its files are read with
torch's own allowlist alone, whatever else the process registered: the additions are set aside for
the duration of the read and put back after it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.serialization as ser

# One read at a time sets the registrations aside (they are global, the reads may come from threads).
_lock = threading.Lock()


def load_weights_only(path: Path, *, mmap: bool = False) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)` with torch's default
    allowlist only; raises what torch.load raises."""
    with _lock:
        added = ser.get_safe_globals()
        ser.clear_safe_globals()
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        finally:
            ser.add_safe_globals(added)
