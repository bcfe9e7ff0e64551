"""The checks the training loop makes between steps: non-finite and spiky losses, large gradients,
replicas whose weights drifted apart, and the exit decisions every rank must share.

Each check reads values the loop already has on the host (after its once-per-interval copy), so
none of them adds a device synchronisation to an ordinary step; the replica comparison and the exit
decision make one small collective only when their setting asks for it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from viaduct.training.errors import TrainingRunError

if TYPE_CHECKING:
    from viaduct.training.logging import StepRecord
    from viaduct.training.state import GlobalState

log = logging.getLogger("viaduct")


class NonFiniteLossError(TrainingRunError):
    """The training loss became NaN or infinite (rerun_state_machine.check_for_nan_in_loss)."""


class WeightHashMismatchError(TrainingRunError):
    """Data-parallel replicas hold different weights (train.check_weight_hash_across_dp_replicas_interval)."""


def check_losses(state: GlobalState, records: list[StepRecord], recent: list[float]) -> None:
    rsm = state.cfg.rerun_state_machine
    for record in records:
        if record.nan and rsm.check_for_nan_in_loss:
            raise NonFiniteLossError(
                f"the training loss is {record.losses} at iteration {record.step} (NaN or infinite); "
                "stopping (rerun_state_machine.check_for_nan_in_loss). Lower optimizer.lr, raise "
                "optimizer.clip_grad or check the data; set rerun_state_machine.check_for_nan_in_loss=false "
                "to continue anyway"
            )
        for name, value in record.losses.items():
            # Under validate_results the machine checks every micro-batch's local loss for spikes.
            spiky = rsm.check_for_spiky_loss and rsm.rerun_mode != "validate_results"
            if spiky and recent and value > rsm.spiky_loss_factor * max(recent):
                log.warning(
                    "spiky loss at iteration %d: %s = %.4f is over %.1f × the largest of the last %d (%.4f)",
                    record.step,
                    name,
                    value,
                    rsm.spiky_loss_factor,
                    len(recent),
                    max(recent),
                )
            if math.isfinite(value):
                recent.append(value)
                del recent[:-100]


def check_large_grads(step: int, norm: float, recent: list[float]) -> None:
    """Warn when the grad norm jumps over 10 × the largest of the last 100 (ddp.check_for_large_grads)."""
    if len(recent) >= 10 and norm > 10 * max(recent):
        log.warning(
            "unexpectedly large gradients at iteration %d: grad norm %.4g is over 10 × the largest of the "
            "last %d steps (%.4g)",
            step,
            norm,
            len(recent),
            max(recent),
        )
    if math.isfinite(norm):
        recent.append(norm)
        del recent[:-100]


def weights_match_across_ranks(module: nn.Module, group: dist.ProcessGroup | None = None) -> bool:
    """All data-parallel replicas hold bitwise-identical weights (one checksum per parameter).

    Sharded parameters are compared shard by shard: `group` must then hold the ranks that keep the
    same shards (the data-parallel replicas of the mesh)."""
    with torch.no_grad():
        sums = torch.stack([_local(p.detach()).double().sum() for p in module.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, sums, group=group)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def replica_group(state: GlobalState) -> dist.ProcessGroup | Literal[False] | None:
    """The ranks that hold the same weights (None: all ranks), or False when there are none to compare
    (one process, or every data-parallel rank holds a different shard)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    pmesh = state.dist.parallel if state.dist is not None else None
    if pmesh is None or pmesh.mesh is None:
        return None  # plain DDP: every rank is a replica
    if pmesh.layout.dp_replicate == 1:
        return False
    return pmesh.mesh.get_group("dp_replicate")


def decide_exit(state: GlobalState) -> tuple[bool, bool]:
    """(signal received on any rank, exit_duration_in_mins exceeded on any rank): host-side only."""
    limit = state.cfg.train.exit_duration_in_mins
    handler = state.signal_handler
    signal = bool(handler is not None and handler.received())
    minutes = (time.time() - state.start_time) / 60.0
    over = limit is not None and minutes > limit
    ctx = state.dist
    if ctx is not None and ctx.distributed and (handler is not None or limit is not None):
        flags = torch.tensor([float(signal), float(over)], device=ctx.host_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.host_group)
        signal, over = bool(flags[0]), bool(flags[1])  # a device sync without the gloo group
    return signal, over
