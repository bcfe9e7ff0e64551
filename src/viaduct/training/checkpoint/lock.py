"""One run at a time per checkpoint directory: an exclusive lock on ``<checkpoint.save>/.lock``.

Two runs saving into one directory overwrite each other's ``iter_N.tmp`` and trackers. `pretrain()`
takes this lock at setup, before training, and a second run stops at once with an error naming the
holder (pid, host and start time, written into the lock file by the run that holds it).

The lock is `fcntl.flock` on an open file: the kernel releases it when the holding process exits,
however it dies, so a crash never leaves a stale lock behind (the file stays; its content is only
read while someone holds the lock). Only rank 0 takes it: the lock guards the directory against
another *run*, and one holder per run is enough. One holder per node would not work: on a shared file
system the ranks of one run on different nodes would lock each other out. Where the file system does
not share flock locks between nodes (NFS mounted with ``nolock``, Lustre with ``localflock``), the
lock still keeps out a second run started on the same node as rank 0; where it supports no locks at
all, the run goes on with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from viaduct.config import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import ConfigContainer

__all__ = ["LOCK_FILE", "SaveDirLock", "SaveDirLockedError", "lock_save_dir"]

log = logging.getLogger("viaduct")

LOCK_FILE = ".lock"
_MAX_HOLDER_BYTES = 4096  # what is read of a holder's description (the file is not trusted)


class SaveDirLockedError(ConfigError):
    """Another run holds the lock of the checkpoint directory."""


class SaveDirLock:
    """An exclusive, non-blocking `flock` on ``<root>/.lock``, held until `release()` or exit."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise `SaveDirLockedError` naming the run that holds it."""
        if self._fd is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # O_CLOEXEC: a program this run starts must not inherit (and so keep) the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(
                Problem(
                    "checkpoint.save",
                    f"cannot create the lock file {self.path}: {exc.strerror or exc}",
                    str(self.root),
                    fix="set checkpoint.save to a directory this user can write",
                ),
                header="cannot start training",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SaveDirLockedError(
                    Problem(
                        "checkpoint.save",
                        f"another run is saving checkpoints into this directory: it holds {self.path} "
                        f"({holder})",
                        str(self.root),
                        fix="wait for that run to end (or stop it), or set checkpoint.save to another "
                        "directory",
                    ),
                    header="cannot start training",
                ) from None
            log.warning(
                "cannot lock %s (%s): the file system supports no locks, so nothing stops another run "
                "from saving into %s at the same time",
                self.path,
                exc.strerror or exc,
                self.root,
            )
            return
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (a second call does nothing)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # while still held: nobody reads a description of a run that ended
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> SaveDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    """What the holding run wrote into the lock file, in words (never trusted beyond printing)."""
    try:
        raw = os.pread(fd, _MAX_HOLDER_BYTES, 0)
        info = json.loads(raw.decode("utf-8", "replace"))
        if not isinstance(info, dict):
            raise ValueError
        return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
    except (OSError, ValueError):
        return "the holder did not write its description yet"


def lock_save_dir(cfg: ConfigContainer, ctx: DistributedContext | None = None) -> SaveDirLock | None:
    """Rank 0 locks ``checkpoint.save`` (see the module docstring); every rank gets the outcome.

    Returns the held lock on rank 0 (release it at the end of the run), None elsewhere or without
    ``checkpoint.save``. Raises `SaveDirLockedError` on every rank when another run holds it.
    """
    from viaduct.training.outputs import agree

    if not cfg.checkpoint.save:
        return None
    lock = SaveDirLock(Path(cfg.checkpoint.save).expanduser()) if ctx is None or ctx.rank == 0 else None
    error: ConfigError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except ConfigError as exc:
            error = exc
    agree(ctx, error, "locking the checkpoint directory (rank 0)", "checkpoint.save")
    return lock
