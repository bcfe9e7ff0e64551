"""Where a checkpoint's tensors go: the two `checkpoint.ckpt_format`s behind one small interface.

* ``"torch_dist"`` (`DcpStorage`): torch.distributed.checkpoint. Every rank takes part; plain tensors
  that data-parallel ranks hold identically are written once (spread over the ranks by size with
  `fully_parallel_save`, else all by rank 0); sharded (DTensor) tensors are handed to DCP on every
  rank, which writes each shard once (replicas of a shard, as under hybrid sharding, are
  de-duplicated). Loading reads whatever layout was saved, so a checkpoint written by 2 ranks loads
  into 1 (or 8), and one of sharded parameters into plain ones and back. Works in a single process
  without a process group.
* ``"torch"`` (`TorchStorage`): rank 0 writes one `torch.save` file; every rank reads it (memory-mapped).
  Saving sharded tensors this way is refused (`ConfigContainer.validate()` refuses the combination);
  loading one into sharded parameters takes each rank's part of the full tensors.

Both load *in place* into target tensors, and only ever with `weights_only` unpickling: DCP is never
given a non-tensor value, its index is read by `dcp_index.read_index` (an allowlist unpickler, never
DCP's plain `pickle.load`), and the torch file holds a flat dict of tensors.
"""

from __future__ import annotations

import inspect
import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.tensor import DTensor, distribute_tensor

from viaduct.config import ConfigError, Problem
from viaduct.training.checkpoint.flat import TensorInfo
from viaduct.training.checkpoint.layout import TORCH_TENSORS, save_file
from viaduct.training.checkpoint.safe_load import load_weights_only

# What a checkpoint read or write may raise, to catch around one. DCP raises CheckpointException, a
# BaseException subclass that `except Exception` would let through as a raw traceback (a truncated
# shard, a missing file on another rank).
STORAGE_ERRORS: tuple[type[BaseException], ...] = (Exception, CheckpointException)


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every single-process call ("assuming the intent is to save in a single process"),
    # which is exactly what we ask for with no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


class _RecordingFileSystem(FileSystem):
    """DCP's file system, keeping every error raised while one of its files is open.

    DCP's extra writer threads (``thread_count`` > 1) die on an exception without reporting it: the
    save returns as if it had succeeded and the index lacks what the thread was writing (seen with a
    full disk), and the thread's traceback is printed to stderr. Here the failed file is abandoned and
    its error kept instead, on every thread alike; `DcpStorage.write` raises the first one once DCP
    returns (its index is never committed then).
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[Exception] = []
        self._lock = threading.Lock()

    def _keep(self, exc: Exception) -> None:
        with self._lock:
            self.errors.append(exc)

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        try:
            stream = cast(io.IOBase, open(path, mode))  # closed by the with below
        except Exception as exc:  # cannot be abandoned quietly: nothing was yielded yet
            self._keep(exc)
            raise
        try:
            with stream:
                yield stream
        except Exception as exc:  # writing, fsync or closing the file
            self._keep(exc)


class _CheckedWriter(FileSystemWriter):
    """`FileSystemWriter` whose writer threads cannot fail silently (see `_RecordingFileSystem`)."""

    def __init__(self, path: Path, *, thread_count: int) -> None:
        super().__init__(str(path), sync_files=True, thread_count=thread_count)
        self.recorder = _RecordingFileSystem()
        self.fs = self.recorder


class TensorStorage(Protocol):
    """A checkpoint format: all ranks call each method with the same directory."""

    name: str

    def share(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this rank hands to `write`: its share of the plain tensors (identical on every
        data-parallel rank), and the sharded (DTensor) ones."""

    def write(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write this rank's `share()` of the tensors into `directory`."""

    def describe(self, directory: Path) -> dict[str, TensorInfo]:
        """The tensors a checkpoint holds, by key, without reading their data."""

    def read(self, directory: Path, targets: dict[str, torch.Tensor]) -> None:
        """Fill every tensor of `targets` in place from the checkpoint (keys must be present)."""


class DcpStorage:
    """torch.distributed.checkpoint files: `__<rank>_<n>.distcp` shards and `.metadata`."""

    name = "torch_dist"

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        group: Any = None,
        fully_parallel_save: bool = True,
        fully_parallel_load: bool = False,
        assume_constant_structure: bool = False,
        peers: list[int] | None = None,
    ) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.peers = peers if peers is not None else list(range(world_size))
        """The ranks that hold the same plain tensors as this one (all, except under pipeline
        parallelism: the ranks of this rank's stage)."""
        self.fully_parallel_save = fully_parallel_save
        # Spreading reads broadcasts over the whole world: only when every rank holds the same tensors.
        self.fully_parallel_load = fully_parallel_load and len(self.peers) == world_size
        self.assume_constant_structure = assume_constant_structure
        # DCP caches plans in class-level dicts keyed by this string: one key per storage object, so two
        # checkpointers in one process (tests, a teacher model) never mix their plans.
        self._plan_key = f"viaduct-{id(self)}"

    @property
    def _no_dist(self) -> bool:
        return self.world_size == 1 or not (dist.is_available() and dist.is_initialized())

    def share(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Plain tensors: decided here rather than by DCP's deduplicating planner, so that a rank copies
        # (and stages) only what it writes: with fully_parallel_save a balanced share, else rank 0
        # writes them all. A DTensor goes to DCP on every rank: each holds only its own shard, and DCP
        # writes each shard once.
        if self._no_dist:
            return dict(tensors)
        plain = {k: t for k, t in tensors.items() if not isinstance(t, DTensor)}
        if self.fully_parallel_save:
            owner = {k: self.peers[i] for k, i in assign_owners(plain, len(self.peers)).items()}
        else:
            owner = dict.fromkeys(plain, self.peers[0])
        return {k: t for k, t in tensors.items() if k not in owner or owner[k] == self.rank}

    def _save_planner(self) -> Any:
        from torch.distributed.checkpoint import DefaultSavePlanner

        # Every plain key comes from one rank (see share()); DCP de-duplicates the replicas of DTensor
        # shards (ranks that hold the same shard, as hybrid sharding's replicas do).
        kwargs: dict[str, Any] = {}
        if (
            self.assume_constant_structure
            and "enable_plan_caching" in inspect.signature(DefaultSavePlanner).parameters
        ):
            kwargs["enable_plan_caching"] = True  # reuse the global plan while the local plans repeat
        planner = DefaultSavePlanner(**kwargs)
        planner._cached_plans_key = self._plan_key
        return planner

    def write(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        from viaduct.training.checkpoint.dcp_index import check_complete, read_index

        # Several files written in parallel: one writer thread leaves disk bandwidth unused.
        writer = _CheckedWriter(directory, thread_count=_WRITER_THREADS)
        try:
            with _quiet_single_process():
                dcp.save(
                    dict(tensors),
                    storage_writer=writer,
                    planner=self._save_planner(),
                    process_group=self.group,
                    no_dist=self._no_dist,
                )
        except BaseException as exc:
            if writer.recorder.errors:  # the file error itself, rather than DCP's wrapped traceback text
                raise writer.recorder.errors[0] from exc
            raise
        if writer.recorder.errors:  # a writer failed, and DCP did not say so
            raise writer.recorder.errors[0]
        if self._no_dist or self.rank == 0:  # the coordinator wrote the index: every tensor is in it
            check_complete(directory, read_index(directory))

    def describe(self, directory: Path) -> dict[str, TensorInfo]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from viaduct.training.checkpoint.dcp_index import check_complete, check_shards, read_index

        # Never DCP's own reader: it unpickles .metadata with plain pickle (see dcp_index).
        meta = read_index(directory)
        check_complete(directory, meta)
        check_shards(directory, meta)  # a truncated shard is named here, before any tensor is read
        return {
            key: TensorInfo(tuple(m.size), m.properties.dtype)
            for key, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)  # all of them: read_index admits nothing else
        }

    def read(self, directory: Path, targets: dict[str, torch.Tensor]) -> None:
        if self.fully_parallel_load and not self._no_dist:
            self._read_spread(directory, targets)
        else:
            self._read(directory, targets)

    def _read(self, directory: Path, targets: dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        from viaduct.training.checkpoint.dcp_index import SafeFileSystemReader

        with _quiet_single_process():
            dcp.load(
                dict(targets),
                storage_reader=SafeFileSystemReader(directory),
                process_group=self.group,
                no_dist=self._no_dist,
            )

    def _read_spread(self, directory: Path, targets: dict[str, torch.Tensor]) -> None:
        """Each rank reads a share of the plain tensors (balanced by bytes), then sends it to the
        others; every rank reads its own shards of the sharded (DTensor) ones."""
        plain = {k: t for k, t in targets.items() if not isinstance(t, DTensor)}
        owner = assign_owners(plain, self.world_size)
        mine = {k: t for k, t in targets.items() if k not in owner or owner[k] == self.rank}
        self._read(directory, mine)
        for key in sorted(plain):  # same order on every rank
            t = plain[key]
            # Device tensors over the default group (NCCL on GPUs), host tensors over the gloo group.
            group = None if t.device.type != "cpu" else self.group
            if t.is_contiguous():
                dist.broadcast(t, src=owner[key], group=group)
            else:
                buf = t.contiguous()
                dist.broadcast(buf, src=owner[key], group=group)
                t.copy_(buf)


def assign_owners(targets: dict[str, torch.Tensor], world_size: int) -> dict[str, int]:
    """Greedy: largest tensor first, to the rank with the fewest bytes so far (deterministic)."""
    load = [0] * world_size
    owner = {}
    for key in sorted(targets, key=lambda k: (-targets[k].numel() * targets[k].element_size(), k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += targets[key].numel() * targets[key].element_size()
    return owner


class TorchStorage:
    """One `model_optim.pt` written by rank 0 (every rank holds the same replicated tensors)."""

    name = "torch"

    def __init__(self, *, rank: int) -> None:
        self.rank = rank

    def share(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sharded = sorted(k for k, t in tensors.items() if isinstance(t, DTensor))
        if sharded:  # the same on every rank: they all refuse together
            raise ConfigError(
                Problem(
                    "checkpoint.ckpt_format",
                    f"writes one file from rank 0, which holds only its shard of {len(sharded)} sharded "
                    f"tensor(s) (e.g. {sharded[0]})",
                    "torch",
                    fix='use checkpoint.ckpt_format="torch_dist" with sharded data parallelism',
                ),
                header="cannot save the checkpoint",
            )
        return dict(tensors) if self.rank == 0 else {}

    def write(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        if self.rank == 0:
            save_file(dict(tensors), directory / TORCH_TENSORS)

    def _open(self, directory: Path) -> dict[str, torch.Tensor]:
        # mmap: describe() and partial reads touch only the pages they need.
        data = load_weights_only(directory / TORCH_TENSORS, mmap=True)
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{directory / TORCH_TENSORS} is not a flat dict of tensors")
        return data

    def describe(self, directory: Path) -> dict[str, TensorInfo]:
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._open(directory).items()}

    def read(self, directory: Path, targets: dict[str, torch.Tensor]) -> None:
        data = self._open(directory)
        with torch.no_grad():
            for key, target in targets.items():
                if isinstance(target, DTensor):
                    # Every rank has the whole tensor: it keeps its own part (no communication).
                    full = data[key].to(device=target.device, dtype=target.dtype)
                    part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                    target.to_local().copy_(part.to_local())
                else:
                    target.copy_(data[key])


_WRITER_THREADS = max(1, min(8, os.cpu_count() or 1))


def make_storage(
    fmt: str, *, rank: int, world_size: int, group: Any, cfg: Any, peers: list[int] | None = None
) -> TensorStorage:
    """The storage for format `fmt` ("torch_dist" or "torch"), tuned by `cfg` (a CheckpointConfig);
    `peers`: see `DcpStorage.peers`."""
    if fmt == "torch":
        return TorchStorage(rank=rank)
    if fmt == "torch_dist":
        return DcpStorage(
            rank=rank,
            world_size=world_size,
            group=group,
            fully_parallel_save=cfg.fully_parallel_save,
            fully_parallel_load=cfg.fully_parallel_load,
            assume_constant_structure=cfg.ckpt_assume_constant_structure,
            peers=peers,
        )
    raise ValueError(f"unknown checkpoint format {fmt!r}")
