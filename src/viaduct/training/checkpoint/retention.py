"""Retention: what is removed from the save directory after each committed checkpoint.

Leftovers (directories of interrupted saves, replacements or deletions, stale tracker temporaries)
go at once; the old checkpoints that `checkpoint.most_recent_k` and `save_retain_interval` let go are
renamed out of the way (no longer loadable) and deleted in a background thread, which the next save
and the end of the run wait for. A symbolic link is removed itself, never what it points to.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viaduct.training.checkpoint import layout
from viaduct.training.checkpoint.async_writer import AsyncWriter

if TYPE_CHECKING:
    from viaduct.training.config.checkpoint import CheckpointConfig

__all__ = ["Retention"]

log = logging.getLogger("viaduct")


class Retention:
    """Applies `checkpoint_cfg`'s retention after each save (rank 0 only); logs when `verbose`."""

    def __init__(self, checkpoint_cfg: CheckpointConfig, *, verbose: bool) -> None:
        self.checkpoint_cfg = checkpoint_cfg
        self.verbose = verbose
        self._deleter = AsyncWriter("viaduct-checkpoint-retention")  # removes old checkpoints
        self._ahead_reported: set[str] = set()  # checkpoints of later steps, warned about once

    def wait(self) -> None:
        """Block until the removal of old checkpoints in flight (if any) is done; raise its error."""
        self._deleter.wait()

    def apply(self, root: Path, just_saved: Path, step: int, loaded_dir: Path | None) -> None:
        """After the save of `step` is committed as `just_saved`: remove leftovers and the checkpoints
        `most_recent_k` lets go, never `loaded_dir` (the one this run started from). Never raises:
        the checkpoint is already committed, so a deletion that fails (a permission, a busy file) is
        a warning, and a symbolic link is removed itself, never what it points to."""
        try:
            self._deleter.wait()  # the previous removal (its leftovers are cleaned up below)
        except Exception as exc:
            log.warning("removing old checkpoints failed: %s", exc)
        # A crash while the tracker was being replaced leaves its temporary file (never read).
        stale = [
            p for name in (layout.TRACKER, layout.LATEST_TRAIN_STATE) for p in root.glob(f".{name}.tmp-*")
        ]
        for leftover in layout.leftovers(root) + [p for p in stale if p.is_symlink() or not p.is_dir()]:
            try:
                layout.remove_tree(leftover)
            except OSError as exc:
                log.warning("could not remove %s (%s); the next save tries again", leftover, exc)
        protected = [just_saved] + ([loaded_dir] if loaded_dir is not None else [])
        found = layout.list_checkpoints(root)
        ahead = [path.name for s, path in found if s > step and path.name not in self._ahead_reported]
        if ahead and (self.checkpoint_cfg.most_recent_k or 0) > 0:
            self._ahead_reported.update(ahead)
            log.warning(
                "%s in %s hold(s) later steps than this run's iteration %d (left by an earlier run or a "
                "crash before the tracker was updated): most_recent_k leaves them alone; a save of the "
                "same step replaces one",
                ahead,
                root,
                step,
            )
        victims = layout.retention_victims(
            found,
            keep_recent=self.checkpoint_cfg.most_recent_k,
            retain_interval=self.checkpoint_cfg.save_retain_interval,
            protected=protected,
            current_step=step,
        )
        if not victims:
            return
        doomed, names = [], []
        for v in victims:
            try:
                doomed.append(layout.retire(v))  # renamed at once: no longer loadable
                names.append(v.name)
            except OSError as exc:
                log.warning("could not retire old checkpoint %s (%s); the next save tries again", v, exc)
        if not doomed:
            return
        self._info(
            "removing old checkpoints (most_recent_k=%d): %s", self.checkpoint_cfg.most_recent_k, names
        )

        def delete() -> None:
            # Deleting tens of GB can take seconds on some file systems: nothing needs to wait for it
            # but the next save's clean-up (and the end of the run).
            t0 = time.perf_counter()
            for d in doomed:
                try:
                    layout.remove_tree(d)  # a retired symbolic link goes, its target stays
                except OSError as exc:
                    log.warning("could not remove %s (%s); the next save tries again", d, exc)
            self._info("removed old checkpoints %s in %.2f s", names, time.perf_counter() - t0)

        self._deleter.submit(f"removal of {names}", delete)

    def _info(self, msg: str, *args: Any) -> None:
        if self.verbose:
            log.info(msg, *args)
