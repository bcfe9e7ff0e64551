"""Pipeline parallelism: the model's layers split into stages on different ranks, run by PyTorch's
schedules (`torch.distributed.pipelining`).

What a step does (`Pipeline.forward_backward`):

* The step's micro-batches are read once, up front, and every stage this rank holds gets its own
  iterator over them: each stage calls the user's forward step once per micro-batch, on the same
  batch, so `forward_step(state, data_iterator, model)` and its loss function work unchanged.
* The first stage's model reads the tokens; a later stage's model gets the previous stage's output
  through `model.set_input_tensor` (sent between ranks in `model.pipeline_dtype`). The last stage's
  output goes to the user's loss function, and the loss is normalized exactly as without pipelining
  (`viaduct.training.train_step.normalize_loss`).
* PyTorch's schedules accumulate the gradients of all micro-batches and reduce-scatter them once, at
  the end of the step. Then the two copies of a tied embedding table (first and last stage) sum their
  gradients, so both take the same update.
* Metrics exist on the last stage; it reduces them over its data-parallel ranks and hands them to the
  other stages when they are read (`share_from_last_stage`).
"""

from __future__ import annotations

import inspect
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.distributed.tensor import DTensor

from viaduct.training.forward_contract import LossFunc, unpack_loss
from viaduct.training.train_step import MetricAccumulator, StepGroups, normalize_loss, scale_by_step_tokens

if TYPE_CHECKING:
    from viaduct.distributed.mesh import ParallelMesh
    from viaduct.distributed.pipeline_split import StageSpec
    from viaduct.models.gpt.model import GPTModel
    from viaduct.training.optim import MixedPrecisionOptimizer

ForwardStep = Callable[[Iterator[Any], nn.Module], tuple[Any, LossFunc]]

# Older PyTorch versions' schedules always keep the last stage's outputs (no return_outputs).
_STEP_TAKES_RETURN_OUTPUTS = "return_outputs" in inspect.signature(Schedule1F1B.step).parameters

_SINGLE = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
_MULTI = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
}


@dataclass
class _Run:
    """One schedule run's state, shared by the stage modules of this rank and the loss function."""

    forward_step: ForwardStep
    batches: list[Any]
    optimizer: MixedPrecisionOptimizer | None
    num_microbatches: int
    per_token_loss: bool
    groups: StepGroups
    forward_only: bool
    iterators: dict[int, Iterator[Any]] = field(default_factory=dict)
    loss_funcs: deque[LossFunc] = field(default_factory=deque)
    metrics: MetricAccumulator = field(default_factory=MetricAccumulator)
    total_tokens: torch.Tensor | None = None


class StageModule(nn.Module):
    """What one `PipelineStage` runs: a model chunk driven by the user's forward step.

    Its input is the previous stage's output (on the first stage, a micro-batch index the schedule
    hands over and nobody reads); its output goes to the next stage, or, on the last stage, to the
    loss function. It is the root that FSDP shards (so PyTorch's schedules manage the gradient
    reduction); checkpoints see `chunk`, whose parameter names are the whole model's.
    """

    def __init__(self, chunk: GPTModel, spec: StageSpec, pipeline_dtype: torch.dtype) -> None:
        super().__init__()
        self.chunk = chunk
        self.spec = spec
        self.pipeline_dtype = pipeline_dtype
        self.run: _Run | None = None

    def forward(self, received: torch.Tensor) -> torch.Tensor:
        run = self.run
        if run is None:
            raise RuntimeError("a pipeline stage runs only inside Pipeline.forward_backward()")
        if not self.spec.pre_process:
            self.chunk.set_input_tensor(received)
        iterator = run.iterators.setdefault(self.spec.vp_stage, iter(run.batches))
        output, loss_func = run.forward_step(iterator, self.chunk)
        if self.spec.post_process:
            if run.forward_only:
                run.metrics.add(unpack_loss(loss_func(output))[2])
            else:
                run.loss_funcs.append(loss_func)
            return output
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                "on a pipeline stage before the last, forward_step must return the model's output "
                f"(its hidden states) as the output, got {type(output).__name__}"
            )
        return output.to(self.pipeline_dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Pipeline:
    """The pipeline stages this rank holds and the schedules that run them (see the module docstring).

    `modules`: this rank's stages in order of their virtual-stage index. `activation_shape(mbs)`:
    the shape of the hidden states one stage sends for a micro-batch of `mbs` samples.
    """

    def __init__(
        self,
        modules: list[StageModule],
        pmesh: ParallelMesh,
        schedule: str,
        device: torch.device,
        activation_shape: Callable[[int], tuple[int, ...]],
        loss_shape: Callable[[int], tuple[int, ...]],
    ) -> None:
        self.modules = modules
        self.pmesh = pmesh
        self.schedule_name = schedule
        self.device = device
        self.activation_shape = activation_shape
        self.loss_shape = loss_shape
        self.pp = pmesh.layout.pp
        self.group = pmesh.pp_group
        self.num_stages = self.pp * len(modules)
        self.is_first = any(m.spec.pre_process for m in modules)
        self.is_last = any(m.spec.post_process for m in modules)
        self.last_rank = dist.get_global_rank(self.group, self.pp - 1)
        self._schedules: dict[tuple[int, int, bool], PipelineScheduleSingle | PipelineScheduleMulti] = {}
        self._run: _Run | None = None

    # ------------------------------------------------------------------ the model, as checkpoints see it

    @property
    def chunks(self) -> list[GPTModel]:
        return [m.chunk for m in self.modules]

    def counted_elsewhere(self) -> set[str]:
        """Names of parameters another stage counts too (the last stage's copy of a tied table)."""
        names = set()
        for chunk in self.chunks:
            tied = chunk.tied_output_weight()
            if tied is not None:
                names |= {n for n, p in chunk.named_parameters() if p is tied}
        return names

    def tied_weight(self) -> torch.Tensor | None:
        """This rank's copy of a tied embedding table that another stage also holds (first or last
        stage of a pipeline whose output layer is tied to the input embedding); None otherwise."""
        if self.pmesh.tied_group is None:
            return None
        for chunk in self.chunks:
            tied = chunk.tied_output_weight()
            if tied is not None:
                return tied
            if chunk.pre_process and chunk.config.share_embeddings_and_output_weights:
                assert chunk.embedding is not None
                return chunk.embedding.word_embeddings.weight
        return None

    @torch.no_grad()
    def sync_tied_weights(self) -> None:
        """Make the last stage's copy of a tied table equal to the first stage's (after initialization;
        a checkpoint holds the table once, and both stages read it)."""
        weight = self.tied_weight()
        if weight is None:
            return
        first = dist.get_global_rank(self.pmesh.tied_group, 0)  # type: ignore[arg-type]
        dist.broadcast(_local(weight.data), src=first, group=self.pmesh.tied_group)

    def _sum_tied_grads(self) -> None:
        weight = self.tied_weight()
        if weight is None or weight.grad is None:
            return
        dist.all_reduce(_local(weight.grad), group=self.pmesh.tied_group)

    # ------------------------------------------------------------------ running a step

    def _stages(self, num_microbatches: int, micro_batch_size: int) -> list[_PipelineStageBase]:
        stages: list[_PipelineStageBase] = []
        hidden = self.activation_shape(micro_batch_size)
        for module in self.modules:
            spec = module.spec
            # What the stages exchange, described (not allocated): hidden states, whose gradients flow
            # back, except into the first stage, whose input is a micro-batch index.
            activation = torch.empty(hidden, dtype=module.pipeline_dtype, device="meta", requires_grad=True)
            inputs = torch.empty(1, dtype=torch.int64, device="meta") if spec.pre_process else activation
            if spec.post_process:
                outputs = torch.empty(self.loss_shape(micro_batch_size), device="meta", requires_grad=True)
            else:
                outputs = activation
            stages.append(
                PipelineStage(
                    module,
                    spec.stage_index,
                    self.num_stages,
                    self.device,
                    input_args=inputs,
                    output_args=outputs,
                    group=self.group,
                )
            )
        return stages

    def _schedule(
        self, num_microbatches: int, micro_batch_size: int, forward_only: bool
    ) -> PipelineScheduleSingle | PipelineScheduleMulti:
        key = (num_microbatches, micro_batch_size, forward_only)
        if key in self._schedules:
            return self._schedules[key]
        stages = self._stages(num_microbatches, micro_batch_size)
        loss_fn = None if forward_only else self._loss
        schedule: PipelineScheduleSingle | PipelineScheduleMulti
        if self.schedule_name in _SINGLE:
            cls = ScheduleGPipe if forward_only else _SINGLE[self.schedule_name]
            schedule = cls(stages[0], num_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            multi = ScheduleLoopedBFS if forward_only else _MULTI[self.schedule_name]
            schedule = multi(stages, num_microbatches, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = schedule
        return schedule

    def _loss(self, output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function on the last stage: the user's, for this micro-batch."""
        run = self._run
        assert run is not None and run.optimizer is not None
        loss_func = run.loss_funcs.popleft()  # micro-batches reach the loss in forward order
        loss, num_tokens, report = unpack_loss(loss_func(output))
        run.metrics.add(report)
        loss, tokens = normalize_loss(loss, num_tokens, run.num_microbatches, run.per_token_loss, run.groups)
        if tokens is not None:
            run.total_tokens = tokens if run.total_tokens is None else run.total_tokens + tokens
        return run.optimizer.scale_loss(loss)

    def _execute(self, run: _Run, micro_batch_size: int) -> None:
        schedule = self._schedule(run.num_microbatches, micro_batch_size, run.forward_only)
        self._run = run
        for module in self.modules:
            module.run = run
        try:
            n = run.num_microbatches
            args = (torch.arange(n, device=self.device),) if self.is_first else ()
            kwargs: dict[str, Any] = {}
            if self.is_last and not run.forward_only:
                kwargs["target"] = torch.arange(n, device=self.device)
            if _STEP_TAKES_RETURN_OUTPUTS:
                kwargs["return_outputs"] = False  # the last stage's outputs are consumed by the loss
            schedule.step(*args, **kwargs)
        finally:
            self._run = None
            for module in self.modules:
                module.run = None

    def forward_backward(
        self,
        forward_step: ForwardStep,
        data_iterator: Iterator[Any],
        optimizer: MixedPrecisionOptimizer,
        num_microbatches: int,
        micro_batch_size: int,
        *,
        per_token_loss: bool = False,
        groups: StepGroups | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward over the step's micro-batches; returns the reduced metrics (on the last
        stage; {} elsewhere). Gradients are ready for the optimizer afterwards."""
        groups = groups or StepGroups()
        batches = [next(data_iterator) for _ in range(num_microbatches)]
        run = _Run(forward_step, batches, optimizer, num_microbatches, per_token_loss, groups, False)
        self._execute(run, micro_batch_size)
        if run.loss_funcs:
            raise RuntimeError(f"{len(run.loss_funcs)} micro-batch(es) never reached the loss function")
        self._sum_tied_grads()
        if per_token_loss:
            # Every stage scales its gradients by the step's token count, which the last stage knows.
            total = run.total_tokens if run.total_tokens is not None else torch.zeros((), device=self.device)
            scale_by_step_tokens(optimizer, total.to(self.device, torch.float32), groups.token_group)
        return self.reduce(run.metrics)

    @torch.no_grad()
    def forward_only(
        self,
        forward_step: ForwardStep,
        data_iterator: Iterator[Any],
        num_microbatches: int,
        micro_batch_size: int,
    ) -> MetricAccumulator:
        """Forward over `num_microbatches` (evaluation); the last stage's accumulated reports."""
        batches = [next(data_iterator) for _ in range(num_microbatches)]
        run = _Run(forward_step, batches, None, num_microbatches, False, StepGroups(), True)
        self._execute(run, micro_batch_size)
        return run.metrics

    def reduce(self, metrics: MetricAccumulator) -> dict[str, torch.Tensor]:
        """The last stage's metrics reduced over its data-parallel ranks; {} on the other stages."""
        if not self.is_last:
            return {}
        return metrics.reduce(self.pmesh.loss_group)

    # ------------------------------------------------------------------ metrics for every rank

    def gather_from_stages(self, values: list[dict[str, float]]) -> list[list[dict[str, float]]]:
        """Every stage's `values` (one list of name -> number per step), in stage order, on every stage
        of this rank's pipeline: two all-gathers of their JSON text, made where the host reads metrics
        anyway, never in an ordinary step."""
        text = torch.tensor(list(json.dumps(values).encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor([text.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.pp)]
        dist.all_gather(sizes, size, group=self.group)
        longest = max(int(n.item()) for n in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: text.numel()] = text
        parts = [torch.empty_like(padded) for _ in range(self.pp)]
        dist.all_gather(parts, padded, group=self.group)
        return [_decode(part[: int(n.item())]) for part, n in zip(parts, sizes)]

    def share_from_last_stage(self, values: list[dict[str, float]]) -> list[dict[str, float]]:
        """The last stage's `values` (its metrics, one dict per step), on every stage."""
        return self.gather_from_stages(values)[-1]


def _decode(payload: torch.Tensor) -> list[dict[str, float]]:
    decoded = json.loads(bytes(payload.cpu().tolist()).decode())
    if not (isinstance(decoded, list) and all(isinstance(d, dict) for d in decoded)):
        raise RuntimeError("a pipeline stage sent malformed metrics")
    return [{str(k): float(v) for k, v in d.items()} for d in decoded]


class PipelineChunks(nn.Module):
    """This rank's model chunks as one module whose parameter and state names are the whole model's
    (each chunk's own names: its layers are keyed by their global index, so no two chunks share a
    name). The optimizer and checkpoints see this; the schedule runs the chunks."""

    def __init__(self, chunks: list[GPTModel]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for chunk in self.chunks:
            yield from chunk.named_parameters(prefix, recurse, remove_duplicate)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        merged: dict[str, Any] = {}
        for chunk in self.chunks:
            merged.update(chunk.state_dict(*args, **kwargs))
        return merged

    def forward(self, *args: object) -> None:
        raise RuntimeError("a pipeline-parallel model runs through its schedule (Pipeline.forward_backward)")
