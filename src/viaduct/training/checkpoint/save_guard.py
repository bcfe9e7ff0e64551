"""What stops a checkpoint save, told in one line: `check_finite` and `SaveErrors`.

A save never writes non-finite weights: `check_finite` checks the model's parameters on their device
(one fused reduction, one host read per save) before any file is touched. `SaveErrors` turns that
refusal, a full disk (ENOSPC, EDQUOT, out of DCP's wrapped tracebacks) or a foreign writer into one
`CheckpointSaveError` that says what was lost and that the tracker still names the last good
checkpoint.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from viaduct.config import Problem
from viaduct.training.checkpoint import layout
from viaduct.training.checkpoint.errors import CheckpointSaveError, root_os_error
from viaduct.training.checkpoint.storage import STORAGE_ERRORS

__all__ = ["SaveErrors", "check_finite"]


class SaveErrors:
    """Turns what stops a save (a full disk, non-finite weights, a foreign writer) into one
    `CheckpointSaveError` line that says what was lost and what was kept."""

    def __init__(self, step: int, root: Path, tmp: Path, total_bytes: int, share_bytes: int) -> None:
        self.step, self.root, self.tmp = step, root, tmp
        self.total_bytes, self.share_bytes = total_bytes, share_bytes

    def kept(self) -> str:
        try:
            last = layout.read_tracker(self.root)
        except (OSError, ValueError):
            last = None
        if last is None:
            return "no earlier checkpoint exists"
        kept = self.root / layout.iter_name(last)
        return f"the tracker still names {kept}, the last good checkpoint, which is kept"

    def refused(self, message: str, fix: str | None = None) -> CheckpointSaveError:
        return CheckpointSaveError(
            Problem(
                "checkpoint.save",
                f"{message} at iteration {self.step}: this checkpoint is not saved and {self.kept()}",
                fix=fix,
            ),
            header=f"cannot save the checkpoint of iteration {self.step}",
        )

    def run(self, fn: Callable[[], None], *, discarded: bool = False) -> None:
        """Run a stage of the save; a full disk becomes one clear error (the chain of DCP's wrapped
        tracebacks adds nothing to it). `discarded`: the caller removes the partial directory when
        this stage fails."""
        try:
            fn()
        except CheckpointSaveError:
            raise
        except STORAGE_ERRORS as exc:
            err = root_os_error(exc)
            if err is None or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise self.disk_full(err, discarded) from None

    def disk_full(self, err: OSError, discarded: bool = False) -> CheckpointSaveError:
        what = "no space left on the device" if err.errno == errno.ENOSPC else "the disk quota is exceeded"
        where = err.filename or self.tmp
        try:
            free = f"{shutil.disk_usage(self.root).free / 1e9:.3f} GB free there now"
        except OSError:
            free = "free space unknown"
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        exc = self.refused(
            f"{what} ({name}) while writing {where}: this rank was writing "
            f"{self.share_bytes / 1e9:.3f} GB of the checkpoint's {self.total_bytes / 1e9:.3f} GB tensors "
            f"({free}){'; its partial directory is removed' if discarded else ''}",
            fix="free space on that file system, point checkpoint.save at a larger one, or keep fewer "
            "checkpoints (checkpoint.most_recent_k)",
        )
        exc.os_error = err
        return exc


def check_finite(model: nn.Module, explain: SaveErrors) -> None:
    """Refuse to save weights holding NaN or infinity (they would become the run's newest checkpoint).

    One fused max-norm per device over every parameter, so the only host synchronisation is the
    read of one flag, once per save; the training loop's steps pay nothing. Sharded (DTensor)
    parameters are checked on each rank's own shard and the flags combined over all ranks (one
    all-reduce), so a NaN in any rank's shard refuses the save on every rank.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    sharded = False
    for p in model.parameters():
        if isinstance(p, DTensor):
            sharded = True
            local = p.to_local()
        else:
            local = p
        if local.is_floating_point() and local.numel() > 0:  # the inf-norm of an empty tensor is undefined
            by_device.setdefault(local.device, []).append(local.detach())
    # The inf-norm is NaN when any element is NaN and inf when any is infinite; unlike the 2-norm it
    # cannot overflow for large finite weights.
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all() for ts in by_device.values()]
    if sharded and dist.is_available() and dist.is_initialized():
        # Every rank takes part, even one whose shards are all empty. On the parameters' device: the
        # default group's backend (NCCL on GPUs) reduces it.
        device = next(iter(by_device), None) or _default_device(model)
        ok = torch.stack([f.to(device) for f in flags]).all() if flags else torch.tensor(True, device=device)
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        finite = ok.bool()
    elif not flags:
        return
    else:
        finite = flags[0] if len(flags) == 1 else torch.stack([f.cpu() for f in flags]).all()
    if not bool(finite):  # the one host read
        raise explain.refused(
            "the model holds NaN or infinite weights",
            fix="resume from the last good checkpoint with a lower optimizer.lr or a smaller "
            "optimizer.clip_grad, or check the data around this iteration",
        )


def _default_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.to_local().device if isinstance(p, DTensor) else p.device
    return torch.device("cpu")
