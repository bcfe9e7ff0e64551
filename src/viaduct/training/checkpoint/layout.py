"""On-disk layout of a checkpoint root, crash-safe writes, finding checkpoints and retention.

```
<root>/
  latest_checkpointed_iteration.txt   tracker: the step of the newest complete checkpoint (Megatron-LM's)
  latest_train_state.pt               tracker: a copy of that checkpoint's train_state.pt (Megatron Bridge's)
  iter_0000500/                       one complete checkpoint (see `Checkpointer` for its files)
  iter_0000600.tmp/                   a checkpoint being written (or left by a crash): never loaded
```

A checkpoint directory gets its final name `iter_NNNNNNN` only by a rename after every file in it
is written and fsynced, so any directory with that name is complete; anything else (`.tmp`,
`.replaced`, `.deleting`) is ignored by loading and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from viaduct.training.checkpoint.safe_load import load_weights_only

TRACKER = "latest_checkpointed_iteration.txt"
LATEST_TRAIN_STATE = "latest_train_state.pt"
"""Megatron Bridge's tracker: a copy of the newest checkpoint's train_state.pt (both trackers are read)."""
METADATA = "metadata.json"
"""JSON description of a checkpoint: format, step, world size, what it holds (readable without torch)."""
COMMON = "common.pt"
TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run_config.yaml"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
TORCH_TENSORS = "model_optim.pt"
"""The single tensor file of the "torch" format."""
DCP_METADATA = ".metadata"
"""Written by torch.distributed.checkpoint last, after all shards."""

WRITER_MARKER = ".writer"
"""Written by rank 0 into ``iter_N.tmp`` when a save starts: a token unique to that save, checked
before the rename, so a writer never gives its final name to a directory another process took over."""

CHECKPOINT_VERSION = 2
"""Written into metadata.json and common.pt. 2: the fused weights' rows are laid out so that a
contiguous share is whole units (`linear_qkv` grouped by query group, gated `linear_fc1` interleaved
gate/up); version-1 checkpoints are converted when loaded (see `checkpoint.upgrade`)."""

_ITER = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER = re.compile(r"^iter_(\d{7,})\.(tmp|replaced|deleting)$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def tmp_path(root: Path, step: int) -> Path:
    # Deterministic, so every rank knows it without a collective; rank 0 clears a stale one first.
    return root / f"{iter_name(step)}.tmp"


def rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank_{rank:05d}.pt"


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` holds a checkpoint itself (rather than being a root of iter_N directories)."""
    return path.is_dir() and any((path / name).is_file() for name in (METADATA, DCP_METADATA, TORCH_TENSORS))


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _ITER.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def leftovers(root: Path) -> list[Path]:
    """Directories left by interrupted saves, replacements or deletions."""
    if not root.is_dir():
        return []
    return sorted(e for e in root.iterdir() if _LEFTOVER.match(e.name) and (e.is_dir() or e.is_symlink()))


def read_tracker(root: Path) -> int | None:
    """The newest step the trackers name (Megatron-LM's text file, Bridge's latest_train_state.pt);
    None when there is neither. Raises ValueError when one is unreadable.

    Both only ever name complete checkpoints; a crash between their two updates leaves them one save
    apart, and the newer is the one to resume from.
    """
    steps = []
    path = root / TRACKER
    if path.is_file():
        text = path.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{path} holds {text[:40]!r}, not a step number")
        steps.append(int(text))
    path = root / LATEST_TRAIN_STATE
    if path.is_file():
        try:
            steps.append(int(load_weights_only(path)["step"]))
        except Exception as exc:  # truncated, not a dict, no step: all mean "unreadable"
            raise ValueError(f"{path} is not a readable train state: {type(exc).__name__}: {exc}") from exc
    return max(steps) if steps else None


def metadata_of(directory: Path) -> dict[str, Any]:
    """The checkpoint's metadata.json, or what can be inferred from its files when it has none."""
    path = directory / METADATA
    if path.is_file():
        return json.loads(path.read_text())
    fmt = "torch" if (directory / TORCH_TENSORS).is_file() else "torch_dist"
    return {
        "format": fmt,
        "contents": {"model": True, "optimizer": True, "rng": (directory / RNG_DIR).is_dir()},
    }


# ---------------------------------------------------------------------------------------- durable writes


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created / renamed files) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def save_file(obj: Any, path: Path) -> int:
    """torch.save `obj` to `path` and fsync it; returns the number of bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def write_text(path: Path, text: str) -> None:
    """Write `text` durably (no atomicity: used inside a not yet renamed directory)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Replace `path` by what `write(tmp)` puts in a temporary file beside it: a reader sees the old
    or the new content, never half. A crash leaves ``.<name>.tmp-<pid>``, which is never read."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: write_text(tmp, text))


def write_tracker(root: Path, step: int, train_state: dict[str, Any] | None = None) -> None:
    """Name `step` as the newest checkpoint: the text tracker, then (with `train_state`) Bridge's
    latest_train_state.pt, each replaced atomically."""
    write_text_atomic(root / TRACKER, f"{step}\n")
    if train_state is not None:
        replace_atomically(root / LATEST_TRAIN_STATE, lambda tmp: save_file(train_state, tmp))


def remove_tree(path: Path) -> None:
    """Delete `path` without ever following a symbolic link: a link (to a directory or not) is
    removed itself and its target is left alone; a real directory is removed with its contents
    (`shutil.rmtree` unlinks the links inside it too). Nothing there is not an error."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def retire(path: Path) -> Path:
    """Rename checkpoint `path` to `iter_N.deleting` (no longer loadable); returns the new path.

    Deleting that is then safe at any pace: a crash midway never leaves a half-deleted `iter_N`, and
    the next save removes what is left. A symbolic link is renamed itself (rename never follows it).
    """
    if not _ITER.match(path.name):
        return path
    doomed = path.with_name(f"{path.name}.deleting")
    remove_tree(doomed)
    os.rename(path, doomed)
    return doomed


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory (see `retire`); a symbolic link is removed, never its target."""
    if path.exists() or path.is_symlink():
        remove_tree(retire(path))


def write_marker(tmp: Path, token: str) -> None:
    write_text(tmp / WRITER_MARKER, token)


def commit_problem(tmp: Path, token: str, fmt: str) -> str | None:
    """Why `tmp` must not be committed by the save holding `token` (None: it may be).

    The directory must still carry this save's marker (another run saving the same step into the
    same directory replaces it) and hold the files that make a checkpoint complete.
    """
    try:
        found = (tmp / WRITER_MARKER).read_text()
    except OSError:
        found = None
    if found != token:
        return (
            f"{tmp.name} was replaced by another process while this run was writing it "
            "(two runs saving into one directory?)"
        )
    needed = [METADATA, COMMON, TRAIN_STATE, DCP_METADATA if fmt == "torch_dist" else TORCH_TENSORS]
    missing = [name for name in needed if not (tmp / name).is_file()]
    if missing:
        return f"{tmp.name} lacks {missing} after every rank reported success"
    return None


def commit(tmp: Path, final: Path) -> None:
    """Give the fully written `tmp` its final name (replacing an older save of the same step)."""
    fsync_dir(tmp)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f"{final.name}.replaced")
        remove_tree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        remove_tree(old)


# ---------------------------------------------------------------------------------------- retention


def retention_victims(
    checkpoints: Iterable[tuple[int, Path]],
    *,
    keep_recent: int,
    retain_interval: int | None,
    protected: Iterable[Path],
    current_step: int | None = None,
) -> list[Path]:
    """Checkpoints `most_recent_k` lets go: all but the `keep_recent` newest, sparing multiples of
    `retain_interval` and the `protected` directories (the one just saved, the one loaded).

    Checkpoints of steps after `current_step` (the one just saved) are left out altogether: they come
    from another timeline (a run that went further before this one resumed from an earlier step, or
    a crash between a checkpoint's rename and the tracker's update). Counting them would let them
    push this run's own checkpoints out; deleting them would destroy work a user may still want.
    """
    if keep_recent is None or keep_recent < 1:
        return []
    ordered = sorted(c for c in checkpoints if current_step is None or c[0] <= current_step)
    keep = {path for _, path in ordered[-keep_recent:]}
    spared = {os.path.realpath(p) for p in protected}
    return [
        path
        for step, path in ordered
        if path not in keep
        and not (retain_interval and step % retain_interval == 0)
        and os.path.realpath(path) not in spared
    ]
