"""Which checkpoint a run loads, decided from `CheckpointConfig` alone.

1. ``load`` set: the directory itself when it is one checkpoint; else ``iter_{ckpt_step}`` (which must
   exist); else the tracker's step, or the newest complete ``iter_N`` when the tracker is missing or
   names a deleted checkpoint. Loaded as a full resume, or weights only with ``finetune``.
2. ``load`` holds nothing: ``pretrained_checkpoint`` (weights only) when set; else an error with
   ``exit_on_missing_checkpoint``; else nothing (fresh weights).
3. Only ``pretrained_checkpoint``: a checkpoint root or one ``iter_N`` directory, weights only; or a
   Hugging Face model directory (config.json and safetensors), whose weights are converted on load.

A checkpoint explicitly asked for but absent or unreadable raises `CheckpointError` naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from viaduct.training.checkpoint import layout as L
from viaduct.training.checkpoint.errors import checkpoint_problem
from viaduct.training.config.checkpoint import CheckpointConfig, is_hf_model_dir

log = logging.getLogger("viaduct")


@dataclass(frozen=True)
class Source:
    """The checkpoint to load and how."""

    directory: Path
    weights_only: bool
    field: str
    """The config field that asked for it (named in errors)."""
    hf: bool = False
    """A Hugging Face model directory rather than a viaduct checkpoint (weights only)."""


def resolve(c: CheckpointConfig, *, verbose: bool = True) -> Source | None:
    """The checkpoint `c` asks to load, or None when there is none to load."""
    if c.load is not None:
        found = find_checkpoint(Path(c.load).expanduser(), "checkpoint.load", c.ckpt_step, verbose=verbose)
        if found is not None:
            return Source(found, c.finetune, "checkpoint.load")
        if c.pretrained_checkpoint is None:
            if c.exit_on_missing_checkpoint:
                raise checkpoint_problem(
                    "checkpoint.load",
                    "holds no checkpoint and exit_on_missing_checkpoint is true",
                    c.load,
                    fix="check checkpoint.load, or set checkpoint.exit_on_missing_checkpoint=false "
                    "to start from freshly initialised weights",
                )
            if verbose:
                log.info("no checkpoint found in %s: starting from freshly initialised weights", c.load)
            return None
    return resolve_pretrained(c, verbose=verbose)


def resolve_pretrained(c: CheckpointConfig, *, verbose: bool = True) -> Source | None:
    """The base weights `checkpoint.pretrained_checkpoint` names (weights only), or None when unset."""
    if c.pretrained_checkpoint is not None:
        fld = "checkpoint.pretrained_checkpoint"
        path = Path(c.pretrained_checkpoint).expanduser()
        if not L.is_checkpoint_dir(path) and is_hf_model_dir(path):
            return Source(path, True, fld, hf=True)
        found = find_checkpoint(Path(c.pretrained_checkpoint).expanduser(), fld, None, verbose=verbose)
        if found is None:
            raise checkpoint_problem(
                fld,
                "holds no checkpoint (neither an iter_N directory nor a root with complete ones, nor a "
                "Hugging Face model directory with config.json and safetensors)",
                c.pretrained_checkpoint,
                fix="point checkpoint.pretrained_checkpoint at a checkpoint root or one iter_N directory",
            )
        return Source(found, True, fld)
    return None


def find_checkpoint(root: Path, fld: str, step: int | None, *, verbose: bool = True) -> Path | None:
    """The checkpoint directory `root` designates: itself, its `step`, or its latest (None: empty)."""
    if L.is_checkpoint_dir(root):
        return root
    if step is not None:
        wanted = root / L.iter_name(step)
        if not L.is_checkpoint_dir(wanted):
            have = [s for s, _ in L.list_checkpoints(root)]
            raise checkpoint_problem(
                "checkpoint.ckpt_step",
                f"no complete checkpoint of step {step} in checkpoint.load",
                wanted,
                fix=f"choose one of the saved steps {have[-10:]}" if have else "check checkpoint.load",
            )
        return wanted
    try:
        tracked = L.read_tracker(root)
    except (OSError, ValueError) as exc:
        raise checkpoint_problem(
            fld,
            "unreadable tracker",
            root,
            fix=f"repair or delete {L.TRACKER} and {L.LATEST_TRAIN_STATE} there "
            "(without them the newest complete iter_N is loaded), or name one iter_N directory itself",
            cause=exc,
        ) from exc
    if tracked is not None and L.is_checkpoint_dir(root / L.iter_name(tracked)):
        return root / L.iter_name(tracked)
    found = L.list_checkpoints(root)
    if tracked is not None:
        if not found:
            raise checkpoint_problem(
                fld,
                f"the tracker names step {tracked} but no complete checkpoint is there",
                root / L.iter_name(tracked),
                fix=f"restore the checkpoint or delete {root / L.TRACKER}",
            )
        if verbose:
            log.warning(
                "tracker names step %d, which is missing; loading the newest complete checkpoint", tracked
            )
    return found[-1][1] if found else None
