"""The parallel layout of a run, from the config alone: how the world splits into pipeline stages,
data-parallel replicas and shards, tensor-parallel and context-parallel groups, and how data
parallelism is done.

This is pure arithmetic (no process group is needed), so `viaduct config validate`, the memory
planner and the run all read the same answer from one place.

The world is a mesh of shape ``pp × dp_replicate × dp_shard × cp × tp`` (pipeline parallel
outermost, as Megatron orders ranks, and tensor parallel innermost, so a tensor-parallel group sits
on neighbouring ranks, i.e. on one node):

* ``pp`` = `model.pipeline_model_parallel_size` (each pipeline rank holds ``vpp`` model chunks and
  runs a `schedule`; see `viaduct.distributed.pipeline_split`);
* ``tp`` = `model.tensor_model_parallel_size`, ``cp`` = `model.context_parallel_size`;
* ``dp`` = world / (tp × cp × pp), the data-parallel size that batch arithmetic uses;
* sharded data parallelism (see `ShardingStrategy`) splits ``dp`` into ``dp_replicate`` =
  `ddp.num_distributed_optimizer_instances` replicas of ``dp_shard`` = dp / replicas ranks each
  (hybrid sharding); without sharding every data-parallel rank is a replica.

How Megatron's data-parallel settings map onto PyTorch FSDP2 (`fully_shard`):

=====================================  ============================================================
Megatron setting                        viaduct / FSDP2
=====================================  ============================================================
neither of the below                    plain data parallel (DDP): ``no_shard``
``ddp.use_distributed_optimizer``       FSDP2, strategy ``optim`` unless
(or ``optimizer.`` twin)                ``ddp.data_parallel_sharding_strategy`` says otherwise
``ddp.use_megatron_fsdp`` /             FSDP2, strategy ``optim_grads_params`` unless
``dist.use_torch_fsdp2``                ``ddp.data_parallel_sharding_strategy`` says otherwise
strategy ``optim``                      ``reshard_after_forward=False``; during gradient accumulation
                                        the unsharded gradients accumulate locally and are
                                        reduce-scattered once, at the last micro-batch (ZeRO-1's
                                        memory: parameters and gradients whole, optimizer sharded)
strategy ``optim_grads``                ``reshard_after_forward=False``: parameters stay gathered
                                        from forward to backward; gradients are reduce-scattered
                                        every micro-batch (ZeRO-2)
strategy ``optim_grads_params``         ``reshard_after_forward=True``: each layer's parameters are
                                        gathered for its forward and again for its backward (ZeRO-3)
``num_distributed_optimizer_instances`` mesh ``(dp_replicate, dp_shard)``: shard within an instance,
= k                                     replicate across the k instances (HSDP)
=====================================  ============================================================

Tensor, context and pipeline parallelism always use FSDP2 for their data-parallel part (DTensor
parameters cannot go through DDP's buckets, and PyTorch's pipeline schedules drive FSDP2's gradient
reduction themselves): with ``no_shard`` that is a mesh whose shard dimension has size 1, i.e. pure
replication.

Under pipeline parallelism PyTorch's schedules reduce-scatter the gradients once per step, after the
last micro-batch, whatever the sharding strategy, and keep each stage's parameters gathered from one
micro-batch to the next (they are freed after the step). So ``optim_grads`` and
``optim_grads_params`` save less memory than without it: gradients accumulate unsharded during a
step and the stage's weights are whole at its peak; what stays sharded between steps is the
float32 weights, their gradients and the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from viaduct.training.config.container import ConfigContainer

ShardingStrategy = Literal["no_shard", "optim", "optim_grads", "optim_grads_params"]
"""What data-parallel ranks shard: nothing, optimizer state, + gradients, + parameters."""

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The mesh dimension names, outermost first."""


@dataclass(frozen=True)
class ParallelLayout:
    """How `world_size` ranks are arranged; see the module docstring."""

    world_size: int
    tp: int = 1
    cp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    strategy: ShardingStrategy = "no_shard"
    sequence_parallel: bool = False
    pp: int = 1
    """Pipeline-parallel size (stages of the model along the pipeline ranks)."""
    vpp: int = 1
    """Model chunks (virtual stages) each pipeline rank holds."""
    schedule: str | None = None
    """The pipeline schedule (`viaduct.distributed.pipeline_split.PipelineSchedule`); None without
    pipeline parallelism."""

    @property
    def dp(self) -> int:
        """Data-parallel size: ranks that see different data (replicas × shards)."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        """Whether data-parallel ranks shard anything (a sharding strategy over more than one rank)."""
        return self.strategy != "no_shard" and self.dp > 1

    @property
    def uses_fsdp(self) -> bool:
        """Whether FSDP2 does the data-parallel part; otherwise DDP (or nothing, on one rank: a sharding
        strategy on one data-parallel rank has nothing to shard over)."""
        return self.sharded or self.tp > 1 or self.cp > 1 or self.pp > 1

    @property
    def reshard_after_forward(self) -> bool:
        """FSDP2's `reshard_after_forward`: free gathered parameters after each layer's forward."""
        return self.strategy == "optim_grads_params"

    @property
    def sync_grads_every_microbatch(self) -> bool:
        """Whether gradients are reduce-scattered after each micro-batch (else only after the last,
        always so under pipeline parallelism)."""
        return self.strategy in ("optim_grads", "optim_grads_params") and self.pp == 1

    @property
    def mesh_shape(self) -> tuple[int, int, int, int, int]:
        """Sizes along `MESH_DIMS`."""
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def grad_shards(self) -> int:
        """Ranks over which FSDP shards parameters, gradients and optimizer state (dp_shard × cp).

        Context-parallel ranks hold the same weights and see different tokens of the same samples,
        so they reduce gradients together with the data-parallel shards, and FSDP shards over both.
        """
        return self.dp_shard * self.cp if self.uses_fsdp else 1

    def describe(self) -> str:
        """One line, e.g. "dp 4 (2 replicas × 2 shards, optim_grads_params) × cp 1 × tp 2", preceded by
        "pp 2 (interleaved_1f1b, 2 virtual stages) × " under pipeline parallelism."""
        if self.sharded and self.dp_replicate > 1:
            dp = f"dp {self.dp} ({self.dp_replicate} replicas × {self.dp_shard} shards, {self.strategy})"
        elif self.sharded:
            dp = f"dp {self.dp} (sharded, {self.strategy})"
        else:
            dp = f"dp {self.dp} (replicated)"
        sp = " with sequence parallel" if self.sequence_parallel else ""
        pp = ""
        if self.pp > 1:
            chunks = f", {self.vpp} virtual stages" if self.vpp > 1 else ""
            schedule = self.schedule or ("interleaved_1f1b" if self.vpp > 1 else "1f1b")
            pp = f"pp {self.pp} ({schedule}{chunks}) × "
        return f"{pp}{dp} × cp {self.cp} × tp {self.tp}{sp}"


def sharding_strategy(cfg: ConfigContainer) -> ShardingStrategy:
    """The effective data-parallel sharding strategy of `cfg` (see the module docstring's table)."""
    ddp, opt = cfg.ddp, cfg.optimizer
    if ddp.data_parallel_sharding_strategy != "no_shard":
        return ddp.data_parallel_sharding_strategy
    if ddp.use_megatron_fsdp or cfg.dist.use_torch_fsdp2:
        return "optim_grads_params"
    if ddp.use_distributed_optimizer or opt.use_distributed_optimizer:
        return "optim"
    return "no_shard"


def layout_of(cfg: ConfigContainer, world_size: int) -> ParallelLayout:
    """The layout `cfg` asks for on `world_size` ranks. Sizes that do not divide are reported by
    `ConfigContainer.validate()`; here they are rounded down to keep this function total."""
    from viaduct.distributed.pipeline_split import effective_schedule, num_virtual_stages

    model = cfg.model
    tp = max(1, int(getattr(model, "tensor_model_parallel_size", 1) or 1))
    cp = max(1, int(getattr(model, "context_parallel_size", 1) or 1))
    pp = max(1, int(getattr(model, "pipeline_model_parallel_size", 1) or 1))
    dp = max(1, world_size // (tp * cp * pp))
    strategy = sharding_strategy(cfg)
    replicas = dp
    if strategy != "no_shard":
        replicas = max(1, min(dp, cfg.ddp.num_distributed_optimizer_instances))
    return ParallelLayout(
        world_size=world_size,
        tp=tp,
        cp=cp,
        dp_replicate=replicas,
        dp_shard=dp // replicas,
        strategy=strategy,
        sequence_parallel=bool(getattr(model, "sequence_parallel", False)) and tp > 1,
        pp=pp,
        vpp=num_virtual_stages(model) if pp > 1 else 1,
        schedule=effective_schedule(model) if pp > 1 else None,
    )
