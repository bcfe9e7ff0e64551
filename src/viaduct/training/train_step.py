"""One optimizer step: forward/backward over the micro-batches, then the update.

Reading it top to bottom gives the whole contract: zero the gradients; for each micro-batch run the
user's forward step and loss function, normalize the loss, backward (inside DDP's `no_sync` for all
but the last micro-batch, so gradients are reduced once; under FSDP with strategy `optim` likewise,
otherwise FSDP reduce-scatters every micro-batch); reduce the reported metrics over micro-batches and
ranks on the device; step the optimizer.

Context parallelism splits each sample's tokens across ranks whose gradients FSDP averages together
with the data-parallel ones. So that this gives exactly the gradient of the whole sample's mean loss,
each rank divides its loss sum by the token count of the whole sample group (summed over the
context-parallel ranks) and multiplies by the context-parallel size, which the averaging divides out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from viaduct.distributed.parallelize import fsdp_modules, set_gradient_sync
from viaduct.training.forward_contract import LossFunc, unpack_loss
from viaduct.training.optim import MixedPrecisionOptimizer

if TYPE_CHECKING:
    from viaduct.distributed.pipeline import Pipeline
    from viaduct.training.logging.timers import Timers
    from viaduct.training.rerun import RerunStateMachine

ForwardStep = Callable[[Iterator[Any], nn.Module], tuple[Any, LossFunc]]
"""A forward step with any `state` already bound: `(data_iterator, model) -> (output, loss_func)`."""


@dataclass(frozen=True)
class StepGroups:
    """What the step's arithmetic needs of the parallel layout (the defaults: one process or DDP)."""

    token_group: dist.ProcessGroup | None = None
    """Ranks whose token counts add up to the step's tokens (None: all ranks)."""
    cp_group: dist.ProcessGroup | None = None
    """The context-parallel ranks that share each sample's tokens (None: no context parallelism)."""
    cp_size: int = 1
    defer_grad_sync: bool = False
    """FSDP strategy `optim`: gradients accumulate unsharded and are reduce-scattered at the last
    micro-batch (parameters stay gathered until then)."""


@dataclass
class StepResult:
    """What a step leaves on the device; nothing here has been read by the host."""

    updated: bool
    grad_norm: torch.Tensor | None
    num_zeros: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    """Reduced metrics: [sum, count] reports become sum/count; scalars are micro-batch means."""


class MetricAccumulator:
    """Sums `[sum, count]` reports and averages scalar reports over micro-batches, on the device."""

    def __init__(self) -> None:
        self.pairs: dict[str, torch.Tensor] = {}
        self.scalars: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, report: Mapping[str, torch.Tensor | float]) -> None:
        self.n += 1
        for name, value in report.items():
            t = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            target = self.pairs if t.numel() == 2 else self.scalars
            if t.numel() not in (1, 2):
                raise ValueError(
                    f"loss_func report {name!r} has {t.numel()} elements; use a scalar or [sum, count]"
                )
            t = t.view(-1) if t.numel() == 2 else t.view(())
            target[name] = t if name not in target else target[name] + t

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Final values: all-reduced over `group` when torch.distributed is initialized."""
        return self.reduce_with_flags(None, group)[0]

    def reduce_with_flags(
        self, flags: torch.Tensor | None, group: dist.ProcessGroup | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """`reduce`, with `flags` (a 1-D tensor on the metrics' device) summed over the ranks in the
        same all-reduce: a decision every rank must share costs no collective of its own."""
        names_p, names_s = sorted(self.pairs), sorted(self.scalars)
        if not names_p and not names_s and flags is None:
            return {}, None
        parts = [self.pairs[n] for n in names_p] + [
            (self.scalars[n] / max(self.n, 1)).view(1) for n in names_s
        ]
        if flags is not None:
            parts.append(flags.float().view(-1).to(parts[0].device if parts else flags.device))
        flat = torch.cat(parts)
        n_metrics = 2 * len(names_p) + len(names_s)
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(group)
            dist.all_reduce(flat, group=group)
            scale = torch.ones_like(flat)
            scale[2 * len(names_p) : n_metrics] = 1.0 / world  # scalars: mean over ranks
            flat = flat * scale
        out = {}
        for i, n in enumerate(names_p):
            out[n] = flat[2 * i] / flat[2 * i + 1].clamp(min=1)
        for j, n in enumerate(names_s):
            out[n] = flat[2 * len(names_p) + j]
        return out, (flat[n_metrics:] if flags is not None else None)


def forward_backward(
    forward_step: ForwardStep,
    data_iterator: Iterator[Any],
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    num_microbatches: int,
    *,
    per_token_loss: bool = False,
    forward_only: bool = False,
    groups: StepGroups | None = None,
    local_losses: list[torch.Tensor] | None = None,
) -> MetricAccumulator:
    """Run the micro-batches of one step (no pipeline parallelism); returns the accumulated reports.

    `local_losses` receives each micro-batch's loss as this rank computed it, before any reduction
    (per token when the loss function returns a token count): what the rerun state machine checks."""
    groups = groups or StepGroups()
    metrics = MetricAccumulator()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    defer_fsdp = groups.defer_grad_sync and not forward_only and bool(fsdp_modules(model))
    total_tokens: torch.Tensor | None = None
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        sync_here = not ddp or last
        if defer_fsdp:
            set_gradient_sync(model, last, reshard_after_backward=last)
        if not forward_only:
            # Every micro-batch's gradients go into the main gradients during backward, except the
            # one DDP reduces: its communication hook hands that one over.
            optimizer.main_grads.accumulate_in_backward(not (ddp and last))
        ctx = (
            cast(nn.parallel.DistributedDataParallel, model).no_sync()
            if ddp and not sync_here and not forward_only
            else contextlib.nullcontext()
        )
        with ctx:
            output, loss_func = forward_step(data_iterator, model)
            loss, num_tokens, report = unpack_loss(loss_func(output))
            metrics.add(report)
            if local_losses is not None:
                local = loss.detach().float()
                local_losses.append(
                    local / num_tokens.detach().clamp(min=1) if num_tokens is not None else local
                )
            if forward_only:
                continue
            loss, tokens = normalize_loss(loss, num_tokens, num_microbatches, per_token_loss, groups)
            if tokens is not None:
                total_tokens = tokens if total_tokens is None else total_tokens + tokens
            optimizer.scale_loss(loss).backward()
    if total_tokens is not None:
        scale_by_step_tokens(optimizer, total_tokens, groups.token_group)
    return metrics


def normalize_loss(
    loss: torch.Tensor,
    num_tokens: torch.Tensor | None,
    num_microbatches: int,
    per_token_loss: bool,
    groups: StepGroups,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the loss to differentiate for one micro-batch, its tokens for the step's count or None).

    Token-aware losses are divided by their tokens and by the micro-batch count (the mean over the
    step); with the per-token loss, the sum is kept and its tokens are returned for the step's total.
    """
    if num_tokens is not None and per_token_loss:
        return loss, num_tokens.detach()
    if num_tokens is not None and groups.cp_group is not None:
        sample_tokens = num_tokens.detach().clone()
        dist.all_reduce(sample_tokens, group=groups.cp_group)
        loss = loss * groups.cp_size / sample_tokens.clamp(min=1)
    elif num_tokens is not None:
        loss = loss / num_tokens.clamp(min=1)
    return loss / num_microbatches, None


def scale_by_step_tokens(
    optimizer: MixedPrecisionOptimizer, total_tokens: torch.Tensor, group: dist.ProcessGroup | None
) -> None:
    """Megatron's per-token loss: gradients of the loss sum, divided by all tokens of the step."""
    if dist.is_available() and dist.is_initialized():
        total_tokens = total_tokens.clone()
        dist.all_reduce(total_tokens, group=group)
    optimizer.scale_grads(1.0 / total_tokens.clamp(min=1))


def train_step(
    forward_step: ForwardStep,
    data_iterator: Iterator[Any],
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    num_microbatches: int,
    *,
    per_token_loss: bool = False,
    empty_cache_level: int = 0,
    timers: Timers | None = None,
    groups: StepGroups | None = None,
    pipeline: Pipeline | None = None,
    micro_batch_size: int = 1,
    rerun: RerunStateMachine | None = None,
    step: int = 0,
) -> StepResult:
    """Forward/backward over `num_microbatches`, then the optimizer step.

    With `pipeline`, its schedule runs the micro-batches over the pipeline stages (`model` is then
    unused; `micro_batch_size` sizes the tensors the stages exchange) and the metrics are the last
    stage's ({} on the other stages)."""
    optimizer.zero_grad()
    timer = timers("forward-backward", log_level=1) if timers is not None else None
    if timer is not None:
        timer.start()
    if pipeline is not None:
        losses = pipeline.forward_backward(
            forward_step,
            data_iterator,
            optimizer,
            num_microbatches,
            micro_batch_size,
            per_token_loss=per_token_loss,
            groups=groups,
        )
    elif rerun is not None and rerun.active:

        def run_once(iterator: Iterator[Any]) -> tuple[MetricAccumulator, list[torch.Tensor]]:
            local: list[torch.Tensor] = []
            metrics = forward_backward(
                forward_step,
                iterator,
                model,
                optimizer,
                num_microbatches,
                per_token_loss=per_token_loss,
                groups=groups,
                local_losses=local,
            )
            return metrics, local

        losses = rerun.run_step(step, data_iterator, run_once, optimizer.zero_grad)
    else:
        losses = forward_backward(
            forward_step,
            data_iterator,
            model,
            optimizer,
            num_microbatches,
            per_token_loss=per_token_loss,
            groups=groups,
        ).reduce()
    if timer is not None:
        timer.stop()
    if empty_cache_level >= 1 and torch.cuda.is_available():
        torch.cuda.empty_cache()
    timer = timers("optimizer", log_level=1) if timers is not None else None
    if timer is not None:
        timer.start()
    updated, grad_norm, num_zeros = optimizer.step()
    if timer is not None:
        timer.stop()
    if empty_cache_level >= 2 and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return StepResult(updated, grad_norm, num_zeros, losses)
