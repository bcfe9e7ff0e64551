"""Reading Hugging Face safetensors checkpoints lazily and writing them in shards.

Reading never runs code (safetensors headers are JSON, parsed by `safetensors.safe_open`; pickled
`*.bin` / `*.pt` files are refused) and never loads more than the one tensor asked for. The index
file is untrusted too: it may only name `.safetensors` files directly inside the model directory.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from viaduct.config import ConfigError, Problem

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_INDEX_BYTES = 64 * 2**20
"""An index lists one line per tensor: tens of kilobytes for the largest models. Bigger is not an index."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""safetensors dtype codes a weight may have (converted to the parameter's dtype on copy)."""
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_MAX_HEADER_BYTES = 100 * 2**20
"""safetensors' own limit on a header's size."""


def _error(path: Path | str, message: str, value: Any = None, fix: str | None = None) -> ConfigError:
    fix = fix or "use an intact copy of the model directory (download or export it again)"
    return ConfigError(Problem(str(path), message, value, fix=fix), header="Hugging Face checkpoint")


class SafetensorsReader:
    """The tensors of one Hugging Face model directory, opened file by file as they are asked for.

    Use as a context manager (closes the files). `names()` lists every tensor; `info(name)` gives its
    safetensors dtype code and shape from the header alone; `tensor(name)` reads it.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._files: dict[str, str] = {}  # tensor name -> file name inside the directory
        self._handles: dict[str, Any] = {}
        self._raw: dict[str, tuple[io.FileIO, int, dict[str, Any]]] = {}  # see read_into
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._stack = ExitStack()
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            self._files = self._read_index(index)
        elif single.is_file():
            for name in self._open(SINGLE_FILE).keys():
                self._files[name] = SINGLE_FILE
        else:
            pickled = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt")
            )
            raise _error(
                self.directory,
                f"has neither {SINGLE_FILE} nor {INDEX_FILE}"
                + (f" (only pickled weights: {', '.join(pickled[:5])})" if pickled else ""),
                fix="point at a Hugging Face model directory with safetensors weights "
                "(pickled *.bin weights can run code when loaded and are not read; convert them with "
                "transformers' save_pretrained(..., safe_serialization=True) first)",
            )

    def _read_index(self, index: Path) -> dict[str, str]:
        if index.stat().st_size > _MAX_INDEX_BYTES:
            raise _error(index, f"is larger than {_MAX_INDEX_BYTES} bytes: not a safetensors index")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _error(index, f"is not valid JSON: {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise _error(index, "must be an object with a non-empty `weight_map` {tensor name: file name}")
        problems: list[Problem] = []
        for name, file in weight_map.items():
            if not isinstance(file, str) or not _is_plain_file_name(file):
                problems.append(
                    Problem(
                        f"{index}: weight_map.{name}",
                        "must name a .safetensors file directly inside the model directory "
                        "(no directories, no absolute paths, no ..)",
                        file,
                    )
                )
            elif not (self.directory / file).is_file():
                problems.append(
                    Problem(f"{index}: weight_map.{name}", "names a file that does not exist", file)
                )
        if problems:
            raise ConfigError(problems, header="Hugging Face checkpoint: bad safetensors index")
        return dict(weight_map)

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            path = self.directory / file
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise _error(path, f"is not a valid safetensors file: {e}") from None
            self._handles[file] = handle
        return handle

    def names(self) -> list[str]:
        """Every tensor name the checkpoint lists."""
        return list(self._files)

    def file_of(self, name: str) -> Path:
        """The file that holds `name`."""
        return self.directory / self._files[name]

    def _handle_with(self, name: str) -> Any:
        handle = self._open(self._files[name])
        if name not in handle.keys():
            raise _error(self.file_of(name), f"lacks tensor {name!r}, which {INDEX_FILE} places there")
        return handle

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype code, shape) of a tensor, from the file header only."""
        sl = self._handle_with(name).get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (on the CPU)."""
        return self._handle_with(name).get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor `name` into `out` (as many elements; any shape, strides, float dtype, device).

        Read with ordinary file reads rather than through the memory map: straight into `out` when
        it is a contiguous CPU tensor of the file's dtype, else into one reused buffer and copied
        from there. So loading a model never leaves the checkpoint's pages mapped into the process
        (they would count in its resident memory on top of the model until the file is closed) and
        allocates no fresh memory per tensor (first-touch page faults cost more than the copy).
        """
        code, shape = self.info(name)  # through safe_open: the header is validated before any read
        f, data_start, header = self._raw_file(self._files[name])
        entry = header.get(name)
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (-1, -1)
        dtype = _TORCH_DTYPES.get(code)
        numel = math.prod(shape)
        if (
            dtype is None
            or type(begin) is not int
            or type(end) is not int
            or not 0 <= begin <= end
            or out.numel() != numel
            or end - begin != numel * dtype.itemsize
        ):
            # Anything unusual, such as a file changed after safe_open checked it: the general path.
            out.copy_(self.tensor(name).reshape(out.shape))
            return
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        if direct:
            target = out.detach().view(-1).view(torch.uint8)
        else:
            if self._scratch.numel() < end - begin:
                self._scratch = torch.empty(end - begin, dtype=torch.uint8)
            target = self._scratch[: end - begin]
        buf = target.numpy().data.cast("B")
        f.seek(data_start + begin)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise _error(self.file_of(name), f"ends inside tensor {name!r} (truncated while reading?)")
            done += n
        if not direct:
            out.copy_(target.view(dtype).view(shape).reshape(out.shape))

    def _raw_file(self, file: str) -> tuple[io.FileIO, int, dict[str, Any]]:
        """The open file, where its data starts and its header (already validated by safe_open)."""
        raw = self._raw.get(file)
        if raw is None:
            path = self.directory / file
            f = self._stack.enter_context(open(path, "rb", buffering=0))
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise _error(path, f"has a header of {n} bytes: not a safetensors file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _error(path, f"has an unreadable header: {e}") from None
            if not isinstance(header, dict):
                raise _error(path, "has a header that is not a JSON object: not a safetensors file")
            raw = self._raw[file] = (f, 8 + n, header)
        return raw

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        self._raw.clear()
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_plain_file_name(file: str) -> bool:
    return (
        file.endswith(".safetensors")
        and file not in (".", "..")
        and "/" not in file
        and "\\" not in file
        and "\0" not in file
        and not os.path.isabs(file)
        and Path(file).name == file
    )


class ShardedWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size` bytes (a tensor larger than
    that gets a shard of its own), named as Hugging Face names them, plus the index.

    Only one shard's tensors are held at a time. `finish()` names the shards
    `model-0000k-of-0000N.safetensors` and writes `model.safetensors.index.json`, or a single
    `model.safetensors` (and no index) when everything fit in one.
    """

    def __init__(self, directory: Path, max_shard_size: int) -> None:
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
            raise ConfigError(Problem("max_shard_size", "must be a positive number of bytes", max_shard_size))
        self.directory, self.max_shard_size = directory, max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (views of one parameter): own each one.
        if t.untyped_storage().nbytes() != t.nbytes or t.storage_offset() != 0:
            t = t.clone()
        nbytes = t.nbytes
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        file = f"shard-{len(self._shards)}.tmp"
        save_file(self._pending, str(self.directory / file), metadata={"format": "pt"})
        self._shards.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, name the shards, write the index; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        files = []
        for k, (tmp, names) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
            files.append(final)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files


def staging_directory(target: Path) -> Path:
    """A fresh empty directory next to `target` (same file system, so `publish` is a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def publish(staging: Path, target: Path) -> None:
    """Move the finished `staging` directory to `target` by renames only: a crash at any point leaves
    either the old `target` or the new one under that name, never a half-written one. An existing
    `target` is moved aside first and deleted once the new one is in place."""
    if target.exists() and not target.is_dir():
        raise _error(target, "exists and is not a directory", fix="choose another output path")
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def iter_files(directory: Path, names: tuple[str, ...]) -> Iterator[Path]:
    """The regular files among `names` in `directory`."""
    for name in names:
        path = directory / name
        if path.is_file():
            yield path
