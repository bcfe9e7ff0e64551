"""Index caches of the datasets: where they live, writing them atomically, reading them back safely.

`GPTDataset` and `BlendedDataset` cache their index arrays as .npy files beside a description
(a .txt of everything that determines them). Each file is written to a temporary name and renamed,
the description last, so a reader never sees a half-written set and concurrent ranks building the
same files are safe. `file_signature` identifies the data a cache was built from without reading it.

A cache file is untrusted input: it is memory-mapped without unpickling and handed to the
dataset's own check (dtypes, shapes, bounds, block by block with `first_bad_row`). A truncated,
garbled or foreign set is reported with an `IndexCacheWarning` and treated as a miss, so the
dataset rebuilds it: never a crash.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from viaduct.config import ConfigError, Problem

_CHECK_ROWS = 1 << 20  # cached index rows checked per block: bounds the check's temporary memory


class IndexCacheWarning(UserWarning):
    """A cached dataset index was unreadable or did not match its dataset, and was rebuilt."""


def user_cache_dir() -> Path:
    """viaduct's per-user cache ($VIADUCT_CACHE, else $XDG_CACHE_HOME/viaduct, else ~/.cache/viaduct)."""
    from viaduct.data.builtin import cache_root

    return cache_root()


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        return True
    except OSError:
        return False


def resolve_cache_dir(prefix: str, path_to_cache: str | os.PathLike[str] | None) -> Path:
    """Where the index caches of `prefix` live: path_to_cache when given; else a `cache/` directory
    next to the data, or the user cache directory when the data's directory is read-only.

    Raises OSError when an explicit path_to_cache cannot be written.
    """
    if path_to_cache is not None:
        directory = Path(path_to_cache).expanduser()
        if not _writable(directory):
            raise OSError(f"cannot write the dataset index cache directory {directory}")
        return directory
    beside = Path(prefix).expanduser().resolve().parent / "cache" / "GPTDataset_indices"
    if _writable(beside):
        return beside
    fallback = user_cache_dir() / "dataset_indices"
    if not _writable(fallback):
        raise OSError(f"neither {beside} nor {fallback} can be written for the dataset index cache")
    return fallback


def atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file in the same directory, then rename over `path` (atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index_file(path: Path) -> np.ndarray:
    """A cached index, memory-mapped; never unpickles (an object array is refused)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_cached_indices(
    paths: dict[str, Path],
    names: Sequence[str],
    description: str,
    check: Callable[[tuple[np.ndarray, ...]], str | None],
) -> tuple[np.ndarray, ...] | None:
    """The cached arrays `names` when the set is complete, readable and passes `check` (which
    returns what is wrong, or None); else None, with an `IndexCacheWarning` when the set is there
    but damaged (a missing file is an ordinary miss: a build that did not finish)."""
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        text = paths["description"].read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        _damaged(paths["description"], f"cannot be read ({err})")
        return None
    if text != description:
        _damaged(paths["description"], "does not describe this dataset")
        return None
    arrays = []
    for name in names:
        try:
            arrays.append(load_index_file(paths[name]))
        except (OSError, ValueError, EOFError) as err:  # truncated, garbage, pickled objects
            _damaged(paths[name], f"cannot be read as a .npy array ({err})")
            return None
    try:
        problem = check(tuple(arrays))
    except ConfigError:
        raise  # the data itself is wrong (e.g. too few tokens): rebuilding would not help
    except (ValueError, IndexError, OverflowError) as err:  # values too wild for the arithmetic
        problem = f"holds values that cannot be checked ({err})"
    if problem is not None:
        _damaged(paths[names[0]].parent, problem)
        return None
    return tuple(arrays)


def _damaged(path: Path, problem: str) -> None:
    """Warn that the cache set is damaged; the caller then treats it as a miss and rebuilds it."""
    warnings.warn(
        IndexCacheWarning(f"dataset index cache {path}: {problem}; rebuilding it"),
        stacklevel=5,  # the code that constructed the dataset
    )


def first_bad_row(n: int, test: Callable[[int, int], np.ndarray]) -> int | None:
    """The first row k < n where `test(a, b)` (a boolean array for rows [a, b)) is true, checked in
    blocks of _CHECK_ROWS rows; None when there is none."""
    for a in range(0, n, _CHECK_ROWS):
        hit = test(a, min(a + _CHECK_ROWS, n))
        if hit.any():
            return a + int(np.argmax(hit))
    return None


def file_signature(prefix: str) -> dict[str, str | int]:
    """What identifies the data of `prefix` without reading it: its real path, and size and mtime
    of the .idx (and the .bin's size)."""
    real = os.path.realpath(prefix)
    try:
        idx, binf = os.stat(real + ".idx"), os.stat(real + ".bin")
    except FileNotFoundError as err:
        raise ConfigError(
            Problem(
                str(err.filename),
                "file not found",
                fix="check the path prefix (without .bin/.idx); build the files: `viaduct data preprocess`",
            )
        ) from err
    return {
        "prefix": real,
        "idx_size": idx.st_size,
        "idx_mtime_ns": idx.st_mtime_ns,
        "bin_size": binf.st_size,
    }
