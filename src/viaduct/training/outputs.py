"""Every path a training run writes, checked for writability at setup, before any step runs.

Without this an unwritable ``checkpoint.save`` is found at the first save (all the training before it
lost) and an unwritable ``logger.tensorboard_dir`` as a raw traceback from the metrics writer.
`check_outputs` looks at each output the run will write, on the ranks that write it:

* ``checkpoint.save`` (every rank: tensor shards and RNG files; rank 0 also ``progress.txt`` and the
  default W&B directory under it);
* ``logger.tensorboard_dir`` and ``logger.wandb_save_dir`` with W&B on (the last rank, where the
  metrics backends live), and the profiler's trace directory beside the TensorBoard one;
* ``logger.save_config_filepath`` (rank 0, a file);
* ``profiling.memory_snapshot_path`` with ``record_memory_history`` (the profiled ranks, a file).

A directory that does not exist yet is fine when it can be created: its nearest existing ancestor
must be a writable directory. Writability is tested for real, by creating and removing a probe file
(permission bits say nothing for root, a read-only mount or a full quota). All problems are raised
together as one `ConfigError`, on every rank (the ranks agree first, so none is left waiting).
The dataset caches (``dataset.path_to_cache``) are checked where they are built.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from viaduct.config import ConfigError, Problem

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.config import ConfigContainer

__all__ = ["Output", "agree", "check_outputs", "output_problems", "outputs_of"]


@dataclass(frozen=True)
class Output:
    """One path a run writes."""

    field: str
    """The dotted config field that names it."""
    path: Path
    is_dir: bool
    """A directory the run creates files in (else one file the run creates or replaces)."""
    ranks: frozenset[int] | None
    """The ranks that write it; None for every rank."""
    fix: str


def outputs_of(cfg: ConfigContainer, world_size: int) -> list[Output]:
    """The outputs `cfg` makes a run of `world_size` ranks write."""
    lc, last = cfg.logger, frozenset({world_size - 1})
    out: list[Output] = []
    if cfg.checkpoint.save:
        out.append(
            Output(
                "checkpoint.save",
                Path(cfg.checkpoint.save).expanduser(),
                True,
                None,
                "set checkpoint.save to a directory this user can write (no part of its path may be a file)",
            )
        )
    if lc.tensorboard_dir:
        tb = Path(lc.tensorboard_dir).expanduser()
        out.append(
            Output(
                "logger.tensorboard_dir",
                tb,
                True,
                last,
                "set logger.tensorboard_dir to a writable directory, or to null to turn TensorBoard off",
            )
        )
        prof = cfg.profiling
        if prof is not None and prof.use_pytorch_profiler and prof.profile_ranks:
            # pretrain() puts the profiler's traces beside the TensorBoard directory.
            out.append(
                Output(
                    "profiling.use_pytorch_profiler",
                    tb.absolute().parent / "torch_profile",
                    True,
                    frozenset(prof.profile_ranks),
                    "traces go to torch_profile/ beside logger.tensorboard_dir: make that writable",
                )
            )
    if lc.wandb_project and lc.wandb_save_dir:
        out.append(
            Output(
                "logger.wandb_save_dir",
                Path(lc.wandb_save_dir).expanduser(),
                True,
                last,
                "set logger.wandb_save_dir to a writable directory",
            )
        )
    if lc.save_config_filepath:
        out.append(
            Output(
                "logger.save_config_filepath",
                Path(lc.save_config_filepath).expanduser(),
                False,
                frozenset({0}),
                "set logger.save_config_filepath to a file in a writable directory, or to null",
            )
        )
    prof = cfg.profiling
    if prof is not None and prof.record_memory_history and prof.memory_snapshot_path.strip():
        out.append(
            Output(
                "profiling.memory_snapshot_path",
                Path(prof.memory_snapshot_path).expanduser(),
                False,
                frozenset(prof.profile_ranks),
                "set profiling.memory_snapshot_path to a file in a writable directory",
            )
        )
    return out


def _probe(directory: Path) -> str | None:
    """Create and remove a file in `directory`; why that fails, or None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".viaduct-write-check-", dir=directory)
    except OSError as exc:
        return f"{directory} is not writable ({exc.strerror or exc})"
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass  # created, so writable: a probe file left behind is harmless
    return None


def _why_unwritable(out: Output) -> str | None:
    path = out.path
    if path.exists():
        if out.is_dir and not path.is_dir():
            return "exists and is not a directory"
        if not out.is_dir:
            if path.is_dir():
                return "is a directory, not a file"
            if not os.access(path, os.W_OK):
                return "exists and is not writable"
            return _probe(path.parent)  # replaced through a file beside it
        return _probe(path)
    if path.is_symlink():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    # To be created: the nearest existing ancestor must be a directory this process can write.
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot be created: {parent} is a file, not a directory"
            return _probe(parent)
        if parent.is_symlink():
            return f"cannot be created: {parent} is a symbolic link to a missing target"
    return f"cannot be created: no part of {path} exists"


def output_problems(cfg: ConfigContainer, rank: int = 0, world_size: int = 1) -> list[Problem]:
    """Why each output `rank` writes cannot be written (empty when all can)."""
    problems = []
    for out in outputs_of(cfg, world_size):
        if out.ranks is not None and rank not in out.ranks:
            continue
        why = _why_unwritable(out)
        if why is not None:
            problems.append(Problem(out.field, why, str(out.path), fix=out.fix))
    return problems


def agree(ctx: DistributedContext | None, error: ConfigError | None, what: str, field: str = "") -> None:
    """Raise `error` here and a short error on the other ranks when any rank has one.

    A setup check that fails on one rank only must stop every rank: the others would otherwise wait
    in their next collective until the timeout.
    """
    if ctx is None or not ctx.distributed or not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=ctx.host_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.host_group)
    if error is not None:
        raise error
    if int(flag.item()):
        raise ConfigError(
            Problem(field, f"{what} failed on another rank; see that rank's error"),
            header="cannot start training",
        )


def check_outputs(cfg: ConfigContainer, ctx: DistributedContext | None = None) -> None:
    """Raise one `ConfigError` listing every output path this run cannot write (see module docstring)."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    problems = output_problems(cfg, rank, world)
    error = None
    if problems:
        error = ConfigError(
            problems,
            header=f"cannot start training: {len(problems)} output path(s) cannot be written",
        )
    agree(ctx, error, "the check of the output paths")
