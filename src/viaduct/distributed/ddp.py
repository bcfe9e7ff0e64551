"""Data parallelism through `torch.nn.parallel.DistributedDataParallel`, driven by the `ddp` config.

DDP all-reduces gradients in buckets while backward runs. Our communication hook decides *how*:

* `grad_reduce_in_fp32`: 16-bit gradients are all-reduced in float32. What exactly is reduced is
  asked of the optimizer's main gradients (`viaduct.training.main_grads`): with float32 main
  gradients, the last micro-batch's gradients are added to what the earlier micro-batches
  accumulated and that float32 sum is all-reduced in place, so accumulation and reduction both
  happen in float32, as in Megatron.
* `average_in_collective`: the collective averages (ReduceOp.AVG, NCCL); otherwise, and always on
  gloo, which has no AVG, gradients are divided by the data-parallel size before a SUM (Megatron's
  default). A per-token loss (`model.calculate_per_token_loss`) is summed, not averaged: the loop
  divides by the global token count afterwards.
* `check_for_nan_in_grad`: each bucket is checked before it is reduced, so the error names the
  rank whose gradients went bad (this reads a flag per bucket: a device synchronisation).
* `overlap_grad_reduce=False` puts all gradients in one bucket, so the reduction starts after
  backward, as Megatron does without overlap; with overlap, `bucket_size` (parameters) or
  `num_buckets` sets the bucket size (default max(40M, 1M × data-parallel size) parameters).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from viaduct.training.config.distributed import DistributedDataParallelConfig
from viaduct.training.errors import TrainingRunError

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.main_grads import MainGrads
    from viaduct.training.optim import MixedPrecisionOptimizer

_MB = 1024 * 1024


class NonFiniteGradientError(TrainingRunError):
    """A rank produced NaN or infinite gradients (ddp.check_for_nan_in_grad)."""


def bucket_cap_mb(model: nn.Module, cfg: DistributedDataParallelConfig, dp_size: int) -> float:
    """DDP's bucket size in MiB from the config's parameter counts."""
    params = [p for p in model.parameters() if p.requires_grad]
    total_bytes = sum(p.numel() * p.element_size() for p in params)
    elem = params[0].element_size() if params else 4
    if not cfg.overlap_grad_reduce:
        return total_bytes / _MB + 1  # one bucket: the reduction waits for the whole backward
    if cfg.num_buckets is not None:
        return max(total_bytes / cfg.num_buckets / _MB, 1 / _MB)
    count = cfg.bucket_size if cfg.bucket_size is not None else max(40_000_000, 1_000_000 * dp_size)
    return count * elem / _MB


def _comm_hook(
    main_grads: MainGrads,
    *,
    group: dist.ProcessGroup | None,
    dp_size: int,
    reduce_fp32: bool,
    average: bool,
    avg_op: bool,
    check_nan: bool,
    rank: int,
) -> Callable[[object, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    """DDP communication hook implementing the rules in the module docstring."""

    def reduce_bucket(bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        if check_nan and not bool(torch.isfinite(buffer).all()):
            raise NonFiniteGradientError(
                f"rank {rank}: NaN or infinite gradients before the data-parallel all-reduce "
                "(ddp.check_for_nan_in_grad); lower the learning rate or check the data of this rank"
            )
        reduction = main_grads.bucket_to_reduce(bucket, buffer, reduce_in_fp32=reduce_fp32)
        flat, write_back = reduction.tensor, reduction.write_back
        op = dist.ReduceOp.SUM
        if average and avg_op:
            op = dist.ReduceOp.AVG
        elif average:
            flat.div_(dp_size)
        fut = dist.all_reduce(flat, op=op, group=group, async_op=True).get_future()

        def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            out = f.value()[0]
            # Without write-back the result already sits in the main gradients: the bucket's
            # 16-bit values go unused.
            if write_back and out is not buffer:
                buffer.copy_(out)
            return buffer

        return fut.then(done)

    # The registered hook carries no annotations: DDP checks them at runtime, and
    # `from __future__ import annotations` turns dist.GradBucket into a string it rejects.
    def hook(_state, bucket):
        return reduce_bucket(bucket)

    return hook


class _BufferSync(TypedDict, total=False):
    """DDP's switch for syncing buffers before each forward, under its old or its new name."""

    broadcast_buffers: bool
    forward_sync_buffers: bool


def wrap_data_parallel(
    model: nn.Module,
    cfg: DistributedDataParallelConfig,
    optimizer: MixedPrecisionOptimizer,
    ctx: DistributedContext,
    *,
    per_token_loss: bool = False,
) -> DistributedDataParallel:
    """Wrap `model` in DDP over all ranks (pure data parallelism) with viaduct's communication hook,
    which reduces each bucket as `optimizer.main_grads` says."""
    dp_size = ctx.world_size
    # Buffers are deterministic (rotary tables): no need to sync them before every forward. Newer
    # torch names the switch forward_sync_buffers (broadcast_buffers is deprecated there).
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync: _BufferSync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    ddp = DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb(model, cfg, dp_size),
        **no_buffer_sync,
        # .grad becomes a view into DDP's bucket: no copy back after the reduction.
        gradient_as_bucket_view=True,
    )
    ddp.register_comm_hook(
        None,
        _comm_hook(
            optimizer.main_grads,
            group=None,
            dp_size=dp_size,
            reduce_fp32=cfg.grad_reduce_in_fp32,
            average=not per_token_loss,
            avg_op=cfg.average_in_collective and ctx.backend == "nccl",
            check_nan=cfg.check_for_nan_in_grad,
            rank=ctx.rank,
        ),
    )
    return ddp
