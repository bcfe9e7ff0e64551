"""Reading torch.distributed.checkpoint's index (``.metadata``) without ever running code.

DCP pickles its `Metadata` into ``.metadata`` and its `FileSystemReader.read_metadata()` reads it back
with plain `pickle.load`: a crafted file could run any code the moment a checkpoint is loaded or even
inspected. Every path of viaduct that opens a ``torch_dist`` checkpoint goes through `read_index`
instead, which unpickles with `_IndexUnpickler`: it resolves only the classes of `ALLOWED_GLOBALS`
(what torch's own index holds, checked with pickletools on real checkpoints) and refuses everything
else before it is imported or called. `SafeFileSystemReader` hands the index read that way to
`dcp.load` and refuses byte-stream entries, which DCP would unpickle with ``weights_only=False``.

`check_complete` and `check_shards` compare the index with the shard files on disk, so a tensor with
no data, or a truncated or missing shard, is named in one line instead of surfacing as a pickling
error deep inside DCP's reader threads.
"""

from __future__ import annotations

import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future
from torch.serialization import _get_layout

from viaduct.training.checkpoint.layout import DCP_METADATA

__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointIndexError",
    "SafeFileSystemReader",
    "check_complete",
    "check_shards",
    "read_index",
]

# What the pickle of a real index refers to (torch 2.13, found with pickletools on checkpoints that
# viaduct saved), and nothing else. Module and name as pickle spells them -> the object they stand for.
# Byte-stream entries (BytesStorageMetadata) are left out on purpose: viaduct never writes them and
# DCP would load their data with weights_only=False.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch.distributed.checkpoint.metadata", "Metadata"): Metadata,
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"): MetadataIndex,
    ("torch.distributed.checkpoint.metadata", "StorageMeta"): StorageMeta,
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"): TensorStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "TensorProperties"): TensorProperties,
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"): ChunkStorageMetadata,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): _MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    # Maps a layout's name ("torch.strided") to the layout; any other string is a KeyError.
    ("torch.serialization", "_get_layout"): _get_layout,
    # StorageMeta.checkpoint_id: the directory the checkpoint was written to (pathlib moved the class
    # to pathlib._local in Python 3.13; the same class either way).
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,
}
"""Every global a ``.metadata`` file may name; dtypes (``torch.float32``...) are admitted by type."""


class CheckpointIndexError(ValueError):
    """A ``.metadata`` index that is unsafe, corrupt, or inconsistent with the shard files."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        self.reason = message
        """What is wrong, without the path."""
        super().__init__(f"{path}: {message}")


class _IndexUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS` and torch dtypes; never imports a module."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                return value
        raise CheckpointIndexError(
            self._path,
            f"the torch_dist index refers to {module}.{name}, which a checkpoint index never holds: "
            "refused without running it (the file was tampered with or is not a checkpoint index)",
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointIndexError(self._path, "the torch_dist index holds a persistent reference: refused")


def read_index(directory: Path) -> Metadata:
    """The DCP index of checkpoint `directory`, unpickled safely and checked for consistency.

    Raises `CheckpointIndexError` (a ValueError naming the ``.metadata`` file) when it is missing,
    corrupt, names anything outside `ALLOWED_GLOBALS`, or points outside the directory.
    """
    path = Path(directory) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            meta = _IndexUnpickler(f, path).load()
    except CheckpointIndexError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointIndexError(
            path, "the torch_dist index .metadata is missing (an incomplete or damaged checkpoint)"
        ) from exc
    except OSError as exc:
        raise CheckpointIndexError(path, f"cannot read the torch_dist index: {exc.strerror or exc}") from exc
    except Exception as exc:  # truncated or garbage bytes: EOFError, UnpicklingError, TypeError...
        raise CheckpointIndexError(
            path, f"the torch_dist index is corrupt: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    _check_structure(meta, path)
    return meta


def _check_structure(meta: Any, path: Path) -> None:
    def bad(what: str) -> CheckpointIndexError:
        return CheckpointIndexError(path, f"the torch_dist index is malformed: {what}")

    if not isinstance(meta, Metadata):
        raise bad(f"it holds a {type(meta).__name__}, not DCP Metadata")
    if not isinstance(meta.state_dict_metadata, dict):
        raise bad("state_dict_metadata is not a dict")
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(md, TensorStorageMetadata):
            raise bad(f"entry {key!r} is not a tensor")
    storage = meta.storage_data
    if not isinstance(storage, dict):
        raise bad("storage_data is not a dict")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(f"storage entry {index!r} is not a file location")
        rel = info.relative_path
        # Shards are plain files beside the index: nothing else on the disk is ever read.
        if not isinstance(rel, str) or rel in ("", ".", "..") or Path(rel).name != rel or "\\" in rel:
            raise bad(f"shard name {rel!r} points outside the checkpoint directory")
        if not (isinstance(info.offset, int) and isinstance(info.length, int)):
            raise bad(f"shard {rel} has a non-integer byte range")
        if info.offset < 0 or info.length < 0:
            raise bad(f"shard {rel} has a negative byte range")
        if info.transform_descriptors:
            raise bad(f"shard {rel} is stored with transforms {list(info.transform_descriptors)}")


def check_complete(directory: Path, meta: Metadata) -> None:
    """Every tensor the index lists has data in some shard (a failed writer leaves holes)."""
    stored = {index.fqn for index in meta.storage_data}
    missing = sorted(key for key in meta.state_dict_metadata if key not in stored)
    if missing:
        raise CheckpointIndexError(
            Path(directory) / DCP_METADATA,
            f"the torch_dist index lists {len(missing)} tensor(s) with no data in any shard "
            f"(a write that failed): {missing[:5]}{' ...' if len(missing) > 5 else ''}",
        )


def check_shards(directory: Path, meta: Metadata) -> None:
    """Every shard file the index names exists and is at least as long as the byte ranges it is given."""
    directory = Path(directory)
    needed: dict[str, int] = {}
    for info in meta.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        f = directory / rel
        if not f.is_file():
            raise CheckpointIndexError(f, f"shard {rel} named by the index is missing")
        size = f.stat().st_size
        if size < end:
            raise CheckpointIndexError(f, f"shard {rel} is truncated: {size} bytes, the index needs {end}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the index read by `read_index` (given, or read on first use).

    `read_metadata` takes no rank argument on purpose: DCP then never falls back to a per-rank
    ``__<rank>.metadata`` file when the global index is refused.
    """

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._directory = Path(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = read_index(self._directory)
        meta = self._metadata
        if meta.storage_meta is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise CheckpointIndexError(
                self._directory / DCP_METADATA,
                "the torch_dist index asks to unpickle a byte stream: refused (viaduct writes only tensors)",
            )
        return super().read_data(plan, planner)
