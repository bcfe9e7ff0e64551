"""Data parallelism through `torch.nn.parallel.DistributedDataParallel`, driven by the `ddp` config.

DDP all-reduces gradients in buckets while backward runs. Our communication hook decides *how*:

* `grad_reduce_in_fp32`: 16-bit gradients are all-reduced in float32. With the optimizer's float32
  main gradients, the hook adds the last micro-batch's gradients to the main gradients the earlier
  micro-batches accumulated, all-reduces that float32 sum and writes it back: accumulation and
  reduction both happen in float32, as in Megatron.
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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from viaduct.training.config.distributed import DistributedDataParallelConfig

if TYPE_CHECKING:
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.optim import MixedPrecisionOptimizer

_MB = 1024 * 1024


class NonFiniteGradientError(RuntimeError):
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


def _main_grad_buffer(
    flats: dict[int, tuple[tuple[int, ...], torch.Tensor]], index: int, slots: list[Any], buffer: torch.Tensor
) -> torch.Tensor:
    """The flat float32 buffer behind the main grads of one DDP bucket (made on first use).

    The slots' `master.grad` become views into it, in the bucket's parameter order; DDP may rebuild
    its buckets after the first iteration, so a bucket whose parameters changed gets a new buffer
    (the gradients accumulated so far are carried over).
    """
    ids = tuple(id(s) for s in slots)
    entry = flats.get(index)
    if entry is not None and entry[0] == ids:
        return entry[1]
    total = max(buffer.numel(), sum(s.master.numel() for s in slots))
    flat = torch.zeros(total, dtype=torch.float32, device=buffer.device)
    offset = 0
    for s in slots:
        n = s.master.numel()
        view = flat[offset : offset + n].view_as(s.master)
        if not s.fresh and s.master.grad is not None:
            view.copy_(s.master.grad)
        s.master.grad = view
        offset += n
    flats[index] = (ids, flat)
    return flat


def _comm_hook(
    optimizer: MixedPrecisionOptimizer,
    *,
    group: Any,
    dp_size: int,
    reduce_fp32: bool,
    average: bool,
    avg_op: bool,
    check_nan: bool,
    rank: int,
) -> Any:
    """DDP communication hook implementing the rules in the module docstring."""
    flats: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}

    # No annotations here: DDP checks them at runtime and `from __future__ import annotations`
    # would turn dist.GradBucket into a string it rejects.
    def hook(_state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        if check_nan and not bool(torch.isfinite(buffer).all()):
            raise NonFiniteGradientError(
                f"rank {rank}: NaN or infinite gradients before the data-parallel all-reduce "
                "(ddp.check_for_nan_in_grad); lower the learning rate or check the data of this rank"
            )
        slots = [optimizer.by_param.get(id(p)) for p in bucket.parameters()]
        main = optimizer.fp32_main_grads and all(s is not None and s.has_copy for s in slots)
        if main:
            # Main-gradient mode: the float32 main grads of this bucket's parameters live in one flat
            # buffer, so the 16-bit bucket is added into it with one kernel and all-reduced in place.
            flat = _main_grad_buffer(flats, bucket.index(), slots, buffer)  # type: ignore[arg-type]
            fresh = [s.fresh for s in slots]  # type: ignore[union-attr]
            if flat.numel() == buffer.numel() and all(fresh):
                flat.copy_(buffer)
            elif flat.numel() == buffer.numel() and not any(fresh):
                flat.add_(buffer)
            else:
                for s, g in zip(slots, bucket.gradients()):
                    optimizer.add_to_main_grad(s, g)  # type: ignore[arg-type]
            for s in slots:
                s.fresh = False  # type: ignore[union-attr]
        elif reduce_fp32 and buffer.dtype != torch.float32:
            flat = buffer.float()
        else:
            flat = buffer
        op = dist.ReduceOp.SUM
        if average and avg_op:
            op = dist.ReduceOp.AVG
        elif average:
            flat.div_(dp_size)
        fut = dist.all_reduce(flat, op=op, group=group, async_op=True).get_future()

        def done(f: torch.futures.Future[Any]) -> torch.Tensor:
            out = f.value()[0]
            if main:
                return buffer  # reduced in place into the main grads; the 16-bit copies go unused
            if out is not buffer:
                buffer.copy_(out)
            return buffer

        return fut.then(done)

    return hook


def wrap_data_parallel(
    model: nn.Module,
    cfg: DistributedDataParallelConfig,
    optimizer: MixedPrecisionOptimizer,
    ctx: DistributedContext,
    *,
    per_token_loss: bool = False,
) -> DistributedDataParallel:
    """Wrap `model` in DDP over all ranks (pure data parallelism) with viaduct's communication hook."""
    dp_size = ctx.world_size
    # Buffers are deterministic (rotary tables): no need to sync them before every forward. Newer
    # torch names the switch forward_sync_buffers (broadcast_buffers is deprecated there).
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {
        "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False
    }
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
            optimizer,
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
