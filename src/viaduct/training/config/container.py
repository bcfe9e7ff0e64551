"""`ConfigContainer`: the single source of truth for a training run, and its validation.

`validate()` is the lazy point of the design: constructors and assignments only store values;
`validate()` derives everything that depends on them and checks the whole tree, reporting every
problem in one `ConfigError`. It runs, in this order (documented in docs/configuration.md):

1. reset every value derived by a previous validate() (so it is idempotent and follows edits);
2. check every field's type and every "not supported yet" setting;
3. resolve and apply the mixed-precision recipe to model / optimizer / ddp, and comm_overlap's
   explicit choices: data-parallel ones (overlap_grad_reduce, bucket_size) to ddp, pipeline
   send/receive ones (overlap_p2p_comm, batch_p2p_comm) to the model;
4. data-parallel size from the world size and TP·PP·CP;
5. one owner for the sequence length (model.seq_length <-> dataset.seq_length);
6. each component's finalize(): dataset, ddp, optimizer, model, logger, train, scheduler,
   checkpoint, profiling, rng, tokenizer, rerun_state_machine, comm_overlap, peft, dist, ft,
   straggler, nvrx_straggler, inprocess_restart;
7. cross-component rules: batch sizes and micro-batches, evaluation batches, scheduler steps
   (in samples), micro-batch counts the pipeline schedule can run (every step's, ramp-up included),
   the parallel layout's rules, PEFT needs a pretrained checkpoint and targets matching layers of
   every pipeline rank, what the training loop can run (GPT models; GPT and fine-tuning datasets;
   LoRA / DoRA adapters), profiled ranks within the world, environment variable
   names; a warning when dataset.split leaves nothing to evaluate on although evaluation is asked
   for.

What validate() passes, pretrain() runs: the loop re-checks nothing of the configuration. Only what
depends on the machine or on files is found at setup (installed logging packages, CUDA for NVTX
and memory history, tokenizer and data files, what a checkpoint directory holds).
"""

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from viaduct.config import ConfigBase, ConfigError, DType, Problem, derived
from viaduct.config.errors import fields_with_problems, warn
from viaduct.config.provenance import is_user_set
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.models.provider import ModelProvider
from viaduct.models.t5.provider import T5ModelProvider
from viaduct.peft.base import PEFT
from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.config.checkpoint import CheckpointConfig
from viaduct.training.config.dataset import _SPLITS, DataloaderConfig, GPTDatasetConfig
from viaduct.training.config.distributed import DistributedDataParallelConfig, DistributedInitConfig
from viaduct.training.config.finetuning import FinetuningDatasetConfig
from viaduct.training.config.logger import LoggerConfig
from viaduct.training.config.optimizer import OptimizerConfig
from viaduct.training.config.profiling import ProfilingConfig
from viaduct.training.config.resilience import (
    FaultToleranceConfig,
    InProcessRestartConfig,
    NVRxStragglerDetectionConfig,
    RerunStateMachineConfig,
    StragglerDetectionConfig,
)
from viaduct.training.config.rng import RNGConfig
from viaduct.training.config.scheduler import SchedulerConfig, compute_scheduler_steps
from viaduct.training.config.t5_dataset import T5DatasetConfig
from viaduct.training.config.tokenizer import TokenizerConfig
from viaduct.training.config.train import TrainingConfig, ValidationConfig
from viaduct.training.mixed_precision import (
    MixedPrecisionConfig,
    apply_mixed_precision,
    get_mixed_precision_config,
)

if TYPE_CHECKING:
    from viaduct.distributed.layout import ParallelLayout

# The order in which components finalize (step 6 above). A component's finalize may rely on the
# ones before it having run (e.g. train before scheduler).
FINALIZE_ORDER = (
    "dataset",
    "ddp",
    "optimizer",
    "model",
    "logger",
    "train",
    "scheduler",
    "checkpoint",
    "profiling",
    "rng",
    "tokenizer",
    "rerun_state_machine",
    "comm_overlap",
    "peft",
    "dist",
    "ft",
    "straggler",
    "nvrx_straggler",
    "inprocess_restart",
)


@dataclass(kw_only=True)
class ConfigContainer(ConfigBase):
    """Every setting of a training run: model, loop, optimizer, data, logging, checkpoints, ..."""

    env_vars: dict[str, str | int | float | bool] = field(default_factory=dict)
    """Environment variables pretrain() sets before distributed init; a variable already set wins."""
    model: ModelProvider
    """Model architecture, precision and parallelism strategy (GPT, T5, Mamba)."""
    train: TrainingConfig
    """Training loop: batch sizes, iterations, evaluation, exit conditions."""
    optimizer: OptimizerConfig
    """Optimizer type and hyperparameters (the learning rate lives here)."""
    scheduler: SchedulerConfig
    """Learning-rate and weight-decay schedules."""
    dataset: DataloaderConfig
    """Data loading: dataset kind, paths, splits, loader workers."""
    logger: LoggerConfig
    """Console, TensorBoard and Weights & Biases logging."""
    tokenizer: TokenizerConfig
    """Tokenizer kind and files."""
    checkpoint: CheckpointConfig
    """Checkpoint saving, loading and resuming."""
    dist: DistributedInitConfig = field(default_factory=DistributedInitConfig)
    """Process-group initialization."""
    ddp: DistributedDataParallelConfig = field(default_factory=DistributedDataParallelConfig)
    """Data-parallel gradient reduction settings."""
    rng: RNGConfig = field(default_factory=RNGConfig)
    """Random seeds."""
    rerun_state_machine: RerunStateMachineConfig = field(default_factory=RerunStateMachineConfig)
    """NaN / spiky-loss checks on the training loss."""
    mixed_precision: MixedPrecisionConfig | str | None = None
    """Mixed-precision recipe, by name ("bf16_mixed", "fp16_mixed") or as an object."""
    comm_overlap: CommOverlapConfig | None = None
    """Communication-overlap settings."""
    peft: PEFT | None = None
    """Parameter-efficient fine-tuning (LoRA, DoRA)."""
    profiling: ProfilingConfig | None = None
    """Profiling with the PyTorch profiler and memory snapshots."""
    ft: FaultToleranceConfig | None = None
    """Fault tolerance and automatic recovery (not supported yet)."""
    straggler: StragglerDetectionConfig | None = None
    """Megatron Core-style straggler detection: per-rank step-time scores every logger.log_interval."""
    nvrx_straggler: NVRxStragglerDetectionConfig | None = None
    """NVRx-style straggler detection: relative and individual step-time scores, optional stop."""
    inprocess_restart: InProcessRestartConfig | None = None
    """In-process restart for fault tolerance (not supported yet)."""

    data_parallel_size: int | None = derived()
    """Data-parallel size: world size / (tensor × pipeline × context parallel); set by validate()."""
    num_microbatches: int | None = derived()
    """Micro-batches per step: global batch / (micro batch × data-parallel size); set by validate()."""
    world_size: int | None = derived()
    """The world size validate() assumed (argument, torch.distributed, $WORLD_SIZE, or 1)."""

    _moved_sections_: ClassVar[dict[str, tuple[type[ConfigBase], str]]] = {
        # Megatron Bridge moved the evaluation settings out of `train` into `validation`; viaduct
        # keeps Bridge v0.2.0's place, and loading Bridge's newer files moves them back.
        "validation": (ValidationConfig, "train"),
    }
    _legacy_fields_: ClassVar[dict[str, str]] = {
        "optimizer_config_override_provider": "parameter groups follow the fixed no-weight-decay rule",
        "tensor_inspect": "Transformer Engine tensor inspection has no pure-PyTorch equivalent",
    }

    # ------------------------------------------------------------------ validation

    def validate(self, world_size: int | None = None) -> "ConfigContainer":
        """Derive every dependent value and check the whole configuration (see module docstring).

        Raises `ConfigError` listing every problem. Idempotent: edit, validate again, and all
        derived values are recomputed from the user's values. Returns self.
        """
        self._reset_derived()
        problems: list[Problem] = self.check_types()
        broken = fields_with_problems(problems)

        if "mixed_precision" not in broken and not {"model", "optimizer", "ddp"} & broken:
            problems += self._apply_mixed_precision()
        if self.comm_overlap is not None and not {"comm_overlap", "ddp"} & broken:
            self._apply_comm_overlap()
        if not {"checkpoint", "tokenizer"} & broken:
            self._tokenizer_from_pretrained()
        world = self._world_size(world_size)
        self.derive("world_size", world, "validate(world_size)")
        if "model" not in broken:
            problems += self._data_parallel_size(world)
        if not {"model", "dataset"} & broken:
            problems += self._sync_seq_length()
        for name in FINALIZE_ORDER:
            component = getattr(self, name)
            if component is None or name in broken:
                continue
            try:
                component.finalize()
            except ConfigError as exc:
                problems += [p.prefixed(name) for p in exc.problems]
                broken.add(name)
        problems += self._cross_checks(broken)
        problems += self._pipeline_schedule_problems(broken)
        problems += self._hf_copy_problems(broken)
        problems += self._layout_problems(broken)
        problems += self._runnable_problems(broken)
        problems += self._env_var_problems(broken)
        if not {"train", "dataset"} & broken:
            self._warn_if_nothing_to_evaluate()
        if problems:
            raise ConfigError(
                self._with_sources(problems),
                header=f"invalid configuration ({len(problems)} problem{'s' if len(problems) != 1 else ''})",
            )
        return self

    def _apply_mixed_precision(self) -> list[Problem]:
        mp = self.mixed_precision
        if mp is None:
            return []
        label = mp if isinstance(mp, str) else "object"
        if isinstance(mp, str):
            try:
                mp = get_mixed_precision_config(mp)
            except ConfigError as exc:
                return [
                    p.prefixed("mixed_precision")
                    if p.path
                    else Problem("mixed_precision", p.message, self.mixed_precision, p.fix)
                    for p in exc.problems
                ]
            problems = [p.prefixed("mixed_precision") for p in mp.check_types()]
            if problems:
                return problems
        try:
            mp.finalize()
        except ConfigError as exc:
            return [p.prefixed("mixed_precision") for p in exc.problems]
        for note in apply_mixed_precision(mp, self.model, self.optimizer, self.ddp, label=label):
            warn(note)
        return []

    def _tokenizer_from_pretrained(self) -> None:
        """An unset tokenizer follows the pretrained checkpoint: a Hugging Face model directory's own
        tokenizer, or the tokenizer a viaduct checkpoint was trained with (its files, or the copies
        the checkpoint keeps), as people starting from trained weights expect."""
        from viaduct.training.config.checkpoint import is_hf_model_dir

        source = self.checkpoint.pretrained_checkpoint
        tokenizer = self.tokenizer
        if source is None or tokenizer is None or tokenizer.tokenizer_type is not None:
            return
        if is_hf_model_dir(source):
            why = "checkpoint.pretrained_checkpoint (a Hugging Face model directory)"
            tokenizer.derive("tokenizer_type", "HuggingFaceTokenizer", why)
            tokenizer.derive("tokenizer_model", source, why)
            return
        saved = _saved_tokenizer(source)
        if saved is None:
            return
        why = "checkpoint.pretrained_checkpoint (the tokenizer it was trained with)"
        for name, info in type(saved).spec().fields.items():
            value = getattr(saved, name)
            if info.init and value != getattr(tokenizer, name):
                tokenizer.derive(name, value, why)

    def _apply_comm_overlap(self) -> None:
        """Explicit data-parallel overlap choices of comm_overlap land on ddp, tp_comm_overlap and the
        pipeline send/receive choices on the model (Bridge's behaviour)."""
        co = self.comm_overlap
        if co is None:
            return
        if co.tp_comm_overlap and not getattr(self.model, "tp_comm_overlap", True):
            self.model.derive("tp_comm_overlap", True, "comm_overlap.tp_comm_overlap")
        for name in ("overlap_grad_reduce", "overlap_param_gather", "bucket_size"):
            value = getattr(co, name)
            if value is None or getattr(self.ddp, name) == value:
                continue
            source = self.ddp.source_of(name)
            if is_user_set(source):
                warn(
                    f"ddp.{name}={getattr(self.ddp, name)!r} (from {source}) is overridden by "
                    f"comm_overlap.{name}={value!r}"
                )
            self.ddp.derive(name, value, f"comm_overlap.{name}")
        for name in ("overlap_p2p_comm", "batch_p2p_comm"):
            value = getattr(co, name)
            if value is None or getattr(self.model, name, value) == value:
                continue
            source = self.model.source_of(name)
            if is_user_set(source):
                warn(
                    f"model.{name}={getattr(self.model, name)!r} (from {source}) is overridden by "
                    f"comm_overlap.{name}={value!r}"
                )
            self.model.derive(name, value, f"comm_overlap.{name}")

    @staticmethod
    def _world_size(world_size: int | None) -> int:
        if world_size is not None:
            return int(world_size)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size())
        for var in ("WORLD_SIZE", "SLURM_NTASKS"):
            if os.environ.get(var, "").isdigit():
                return int(os.environ[var])
        return 1

    def _data_parallel_size(self, world: int) -> list[Problem]:
        m = self.model
        tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
        model_parallel = tp * pp * cp
        if world <= 0 or world % model_parallel:
            # Named after the first size above 1 (the one to change, or to run more processes for).
            sizes = (
                ("tensor_model_parallel_size", tp),
                ("pipeline_model_parallel_size", pp),
                ("context_parallel_size", cp),
            )
            culprit = next((name for name, size in sizes if size > 1), "tensor_model_parallel_size")
            return [
                Problem(
                    f"model.{culprit}",
                    f"world size {world} is not divisible by tensor × pipeline × context parallel size "
                    f"({tp} × {pp} × {cp} = {model_parallel})",
                    fix=f"run on a multiple of {model_parallel} processes or change the parallel sizes",
                )
            ]
        self.derive(
            "data_parallel_size", world // model_parallel, f"world {world} / (TP·PP·CP {model_parallel})"
        )
        return []

    def _sync_seq_length(self) -> list[Problem]:
        """One owner for the sequence length: whichever side the user set wins; both set must agree."""
        ds = self.dataset
        if not isinstance(ds, (GPTDatasetConfig, FinetuningDatasetConfig)):
            return []  # custom datasets carry no sequence length (Bridge issue #894)
        model_len, data_len = self.model.seq_length, ds.seq_length
        if data_len is None and isinstance(ds, GPTDatasetConfig) and ds.sequence_length is not None:
            # Megatron Core's name for it
            ds.derive("seq_length", ds.sequence_length, "dataset.sequence_length")
            data_len = ds.sequence_length
        if data_len is None:
            ds.derive("seq_length", model_len, "model.seq_length")
            return []
        if model_len == data_len:
            return []
        if not is_user_set(self.model.source_of("seq_length")):
            self.model.derive("seq_length", data_len, "dataset.seq_length")
            return []
        return [
            Problem(
                "dataset.seq_length",
                f"conflicts with model.seq_length ({model_len}, from {self.model.source_of('seq_length')})",
                data_len,
                fix="set one of them only (the other follows), or make them equal",
                source=ds.source_of("seq_length"),
            )
        ]

    def _cross_checks(self, broken: set[str]) -> list[Problem]:
        problems: list[Problem] = []
        t, dp = self.train, self.data_parallel_size
        mbs, gbs = t.micro_batch_size, t.global_batch_size
        eval_gbs, eval_mbs = t.effective_eval_global_batch_size, t.effective_eval_micro_batch_size
        # Unset only when train.finalize() failed (it reported them then) or validate() has not
        # derived the data-parallel size; a train.finalize() that passed sets or derives all four.
        if dp is None or mbs is None or gbs is None or eval_gbs is None or eval_mbs is None:
            return problems
        if "train" in broken:
            return problems  # train.finalize() already reported non-positive batch sizes
        per_step = mbs * dp
        if gbs % per_step and t.decrease_batch_size_if_needed:
            used = max(per_step, gbs - gbs % per_step)
            warn(
                f"train.global_batch_size {gbs} is not divisible by micro batch × "
                f"data-parallel size ({per_step}); decrease_batch_size_if_needed: steps use {used} samples"
            )
            self.derive(
                "num_microbatches",
                used // per_step,
                f"global {used} (rounded down) / (micro × DP {per_step})",
            )
        elif gbs % per_step:
            lower = max(per_step, gbs - gbs % per_step)
            problems.append(
                Problem(
                    "train.global_batch_size",
                    f"must be divisible by train.micro_batch_size × data-parallel size "
                    f"({mbs} × {dp} = {per_step})",
                    gbs,
                    fix=f"use a multiple of {per_step} (e.g. {lower} or {lower + per_step})",
                )
            )
        else:
            self.derive(
                "num_microbatches",
                gbs // per_step,
                f"global {gbs} / (micro {mbs} × DP {dp})",
            )
        if t.rampup_batch_size:
            for name, v in zip(("start", "increment"), t.rampup_batch_size[:2]):
                if v % per_step:
                    problems.append(
                        Problem(
                            "train.rampup_batch_size",
                            f"the {name} batch size {v} must be divisible by micro batch × data-parallel "
                            f"size ({per_step})",
                            t.rampup_batch_size,
                            fix=f"use multiples of {per_step}",
                        )
                    )
        eval_follows_train = t.eval_global_batch_size is None and t.eval_micro_batch_size is None
        if eval_gbs % (eval_mbs * dp) and not (eval_follows_train and problems):
            problems.append(
                Problem(
                    "train.eval_global_batch_size",
                    f"evaluation batch {eval_gbs} must be divisible by eval micro batch × data-parallel size "
                    f"({eval_mbs} × {dp} = {eval_mbs * dp})",
                    eval_gbs,
                    fix=f"set train.eval_global_batch_size to a multiple of {eval_mbs * dp} "
                    "(or change train.eval_micro_batch_size)",
                )
            )
        if "scheduler" not in broken:
            try:
                compute_scheduler_steps(
                    self.scheduler,
                    train_iters=t.effective_train_iters if t.train_samples is None else None,
                    train_samples=t.train_samples,
                    global_batch_size=t.global_batch_size,
                )
            except ConfigError as exc:
                problems += exc.problems
        lr, init = self.optimizer.lr, self.scheduler.lr_warmup_init
        if "optimizer" not in broken and "scheduler" not in broken and lr is not None and init > lr:
            problems.append(
                Problem(
                    "scheduler.lr_warmup_init",
                    f"warmup starts above the peak learning rate (optimizer.lr = {lr})",
                    init,
                    fix="set scheduler.lr_warmup_init <= optimizer.lr",
                )
            )
        if self.logger.log_progress and not self.checkpoint.save:
            problems.append(
                Problem(
                    "logger.log_progress",
                    "writes progress.txt into the checkpoint directory, but checkpoint.save is not set",
                    True,
                    fix="set checkpoint.save, or logger.log_progress=false",
                )
            )
        if self.peft is not None and not self.checkpoint.pretrained_checkpoint:
            problems.append(
                Problem(
                    "peft",
                    "fine-tuning with PEFT needs base weights",
                    type(self.peft).__name__,
                    fix="set checkpoint.pretrained_checkpoint to the base model's checkpoint",
                )
            )
        return problems

    def _pipeline_schedule_problems(self, broken: set[str]) -> list[Problem]:
        """Micro-batch counts per step (steady and during the batch-size ramp-up) that the pipeline
        schedule cannot run (`viaduct.distributed.pipeline_split.schedule_problems`)."""
        from viaduct.distributed.pipeline_split import schedule_problems
        from viaduct.training.microbatches import ramp_batches, rounded_batch

        model, t, dp = self.model, self.train, self.data_parallel_size
        if {"model", "train"} & broken or dp is None or self.num_microbatches is None:
            return []
        if model.pipeline_model_parallel_size <= 1 or t.micro_batch_size is None:
            return []
        per_step = t.micro_batch_size * dp
        problems = schedule_problems(model, [self.num_microbatches], samples_per_microbatch=per_step)
        if t.rampup_batch_size and t.global_batch_size is not None:
            batches = {
                rounded_batch(b, per_step, t.decrease_batch_size_if_needed)
                for b in ramp_batches(t.global_batch_size, t.rampup_batch_size)
            }
            # Batches that do not divide are reported with the batch sizes.
            ramp = sorted(b // per_step for b in batches if b % per_step == 0 and b < t.global_batch_size)
            problems += [
                replace(
                    p,
                    path="train.rampup_batch_size",
                    message="during the batch-size ramp-up, the global batch " + p.message,
                    value=t.rampup_batch_size,
                    fix=p.fix.replace("train.global_batch_size", "the ramp-up batch sizes")
                    if p.fix
                    else None,
                )
                for p in schedule_problems(model, ramp, samples_per_microbatch=per_step)
            ]
        return problems

    def _hf_copy_problems(self, broken: set[str]) -> list[Problem]:
        """checkpoint.also_save_hf_checkpoint: a model a Hugging Face architecture computes, saved
        whole and synchronously."""
        from viaduct.models.conversion.provider_config import hf_config_from_provider

        ck = self.checkpoint
        if "checkpoint" in broken or not ck.also_save_hf_checkpoint:
            return []
        name = "checkpoint.also_save_hf_checkpoint"
        problems = []
        if ck.save is None:
            problems.append(
                Problem(
                    name,
                    "has nothing to write into: checkpoint.save is unset",
                    True,
                    fix="set checkpoint.save, or checkpoint.also_save_hf_checkpoint=false",
                )
            )
        if ck.async_save:
            problems.append(
                Problem(
                    name,
                    "the Hugging Face copy is written with each checkpoint, synchronously",
                    True,
                    fix="set checkpoint.async_save=false, or export later (viaduct checkpoint export-hf)",
                )
            )
        if "model" in broken or not isinstance(self.model, GPTModelProvider):
            return problems
        if self.model.pipeline_model_parallel_size > 1:
            problems.append(
                Problem(
                    name,
                    "is not supported yet with pipeline parallelism (the copy needs every stage's weights)",
                    True,
                    fix="export later (viaduct checkpoint export-hf)",
                )
            )
        try:
            hf_config_from_provider(self.model)
        except ConfigError as exc:  # no Hugging Face architecture computes this model
            problems += [
                replace(
                    p,
                    message="no Hugging Face architecture computes it for its copy "
                    f"(checkpoint.also_save_hf_checkpoint): {p.message}",
                    fix="set checkpoint.also_save_hf_checkpoint=false",
                )
                for p in exc.problems
            ]
        return problems

    def _layout_problems(self, broken: set[str]) -> list[Problem]:
        """Rules of the parallel layout (viaduct.distributed.layout) that span components."""
        from viaduct.distributed.layout import layout_of, sharding_strategy

        problems: list[Problem] = []
        if {"model", "ddp", "optimizer", "dist"} & broken or self.data_parallel_size is None:
            return problems
        dp = self.data_parallel_size
        layout = layout_of(self, self.world_size or 1)
        instances = self.ddp.num_distributed_optimizer_instances
        if instances > 1 and sharding_strategy(self) == "no_shard":
            problems.append(
                Problem(
                    "ddp.num_distributed_optimizer_instances",
                    "hybrid sharding needs sharded data parallelism",
                    instances,
                    fix="set ddp.use_distributed_optimizer=true (or a data_parallel_sharding_strategy), "
                    "or ddp.num_distributed_optimizer_instances=1",
                )
            )
        elif instances > 1 and dp % instances:
            problems.append(
                Problem(
                    "ddp.num_distributed_optimizer_instances",
                    f"must divide the data-parallel size ({dp})",
                    instances,
                    fix="choose a divisor of the data-parallel size",
                )
            )
        for owner in ("ddp", "optimizer"):
            if getattr(self, owner).overlap_param_gather and sharding_strategy(self) == "no_shard":
                problems.append(
                    Problem(
                        f"{owner}.overlap_param_gather",
                        "prefetches sharded parameters, but data parallelism is not sharded",
                        True,
                        fix=f"set ddp.use_distributed_optimizer=true, or {owner}.overlap_param_gather=false",
                    )
                )
        if layout.uses_fsdp and "checkpoint" not in broken and self.checkpoint.ckpt_format == "torch":
            problems.append(
                Problem(
                    "checkpoint.ckpt_format",
                    f"'torch' writes one file of whole tensors from rank 0, but the layout "
                    f"({layout.describe()}) splits the weights across ranks",
                    "torch",
                    fix="set checkpoint.ckpt_format=torch_dist",
                )
            )
        if (
            layout.schedule == "interleaved_zero_bubble"
            and "train" not in broken
            and self.train.torch_compile
        ):
            problems.append(
                Problem(
                    "train.torch_compile",
                    "the interleaved_zero_bubble pipeline schedule splits each backward into input- and "
                    "weight-gradient parts, which PyTorch refuses for compiled stage modules",
                    True,
                    fix="set train.torch_compile=false, or model.pipeline_schedule=interleaved_1f1b",
                )
            )
        if getattr(self.model, "tp_comm_overlap", False) and "train" not in broken:
            if self.train.torch_compile is False:
                problems.append(
                    Problem(
                        "model.tp_comm_overlap",
                        "asynchronous tensor parallelism is a torch.compile pass, but train.torch_compile "
                        "is false",
                        True,
                        fix="set train.torch_compile=true (or leave it unset), or tp_comm_overlap=false",
                    )
                )
        problems += self._cuda_graph_problems(layout, broken)
        if layout.uses_fsdp and "train" not in broken and self.train.torch_compile_scope == "model":
            problems.append(
                Problem(
                    "train.torch_compile_scope",
                    f"the layout ({layout.describe()}) runs FSDP, which gathers and frees each layer's "
                    "weights around it: only per-layer compilation fits",
                    "model",
                    fix="set train.torch_compile_scope=layers (or leave it unset)",
                )
            )
        return problems

    def _cuda_graph_problems(self, layout: "ParallelLayout", broken: set[str]) -> list[Problem]:
        """model.cuda_graph_impl=local: the graphs are what torch.compile records of the compiled
        model, so the run must compile; gradients must leave the graphs' memory as autograd makes
        them (16-bit parameters with float32 main gradients); no PEFT; and one unsharded process."""
        if getattr(self.model, "cuda_graph_impl", "none") != "local" or "model" in broken:
            return []
        problems: list[Problem] = []
        if "train" not in broken and self.train.torch_compile is False:
            problems.append(
                Problem(
                    "model.cuda_graph_impl",
                    "local CUDA graphs are recorded by torch.compile, but train.torch_compile is false",
                    "local",
                    fix="set train.torch_compile=true (or leave it unset), or model.cuda_graph_impl=none",
                )
            )
        params_dtype = DType.canonical_name(self.model.params_dtype)
        sixteen_bit = params_dtype in ("bfloat16", "float16")
        if "ddp" not in broken and not (sixteen_bit and self.ddp.grad_reduce_in_fp32):
            # A parameter's .grad written by a graph lives in the graphs' memory, which the next
            # micro-batch's replay overwrites; float32 main gradients take every 16-bit gradient out
            # of it by the end of its backward pass, before that replay.
            problems.append(
                Problem(
                    "model.cuda_graph_impl",
                    "local CUDA graphs need 16-bit parameters whose gradients go to float32 main "
                    f"gradients, but params_dtype is {params_dtype} and "
                    f"ddp.grad_reduce_in_fp32 is {self.ddp.grad_reduce_in_fp32}",
                    "local",
                    fix="set mixed_precision=bf16_mixed (and ddp.grad_reduce_in_fp32=true), or "
                    "model.cuda_graph_impl=none",
                )
            )
        if self.peft is not None:
            problems.append(
                Problem(
                    "model.cuda_graph_impl",
                    "CUDA graphs with parameter-efficient fine-tuning are not supported yet",
                    "local",
                    fix="set model.cuda_graph_impl=none",
                )
            )
        if layout.world_size > 1 or layout.uses_fsdp:
            problems.append(
                Problem(
                    "model.cuda_graph_impl",
                    "CUDA graphs run in one unsharded process only so far; the layout is "
                    f"{layout.describe()}",
                    "local",
                    fix="run on one GPU, or set model.cuda_graph_impl=none",
                )
            )
        return problems

    def _runnable_problems(self, broken: set[str]) -> list[Problem]:
        """What the training loop cannot run (yet) although each component is sound on its own."""
        problems: list[Problem] = []
        rerun_mode = self.rerun_state_machine.rerun_mode
        if (
            rerun_mode != "disabled"
            and not {"rerun_state_machine", "model"} & broken
            and self.model.pipeline_model_parallel_size > 1
        ):
            problems.append(
                Problem(
                    "rerun_state_machine.rerun_mode",
                    "re-running iterations is not built for pipeline parallelism (a pipeline schedule "
                    "interleaves the micro-batches of the stages, so a step cannot be replayed in place)",
                    rerun_mode,
                    fix="set rerun_state_machine.rerun_mode=disabled or model.pipeline_model_parallel_size=1",
                )
            )
        if self.ft is not None and "ft" not in broken and self.world_size is not None:
            problems += self.ft.run_problems(self.world_size, self.checkpoint.save)
        if (
            self.inprocess_restart is not None
            and "inprocess_restart" not in broken
            and self.world_size is not None
        ):
            ipr = self.inprocess_restart
            problems += ipr.run_problems(self.world_size, self.checkpoint.save, self.checkpoint.load)
        if self.profiling is not None and "profiling" not in broken and self.world_size is not None:
            problems += [p.prefixed("profiling") for p in self.profiling.setting_problems(self.world_size)]
        if isinstance(self.model, T5ModelProvider):
            problems += self._t5_problems(broken)
        elif not isinstance(self.model, GPTModelProvider):
            problems.append(
                Problem(
                    "model",
                    "only GPT models can be trained yet",
                    type(self.model).__name__,
                    fix="use a GPT provider (model._target_: viaduct.models.GPTModelProvider or a named one)",
                )
            )
        if isinstance(self.dataset, FinetuningDatasetConfig):
            if not {"dataset", "model"} & broken:
                problems += self.dataset.layout_problems(self.model.pipeline_model_parallel_size)
        elif isinstance(self.dataset, T5DatasetConfig) and not isinstance(self.model, T5ModelProvider):
            # A GPTDatasetConfig by inheritance (the same indexed files), but its samples are
            # encoder-decoder pairs: a GPT model must never train on them as if they were GPT samples.
            problems.append(
                Problem(
                    "dataset",
                    "T5 span-corruption data trains T5 models (model: T5ModelProvider), not this one",
                    type(self.dataset).__name__,
                    fix=f"use dataset._target_: {GPTDatasetConfig.target()} (or the mock dataset)",
                )
            )
        elif not isinstance(self.dataset, GPTDatasetConfig):
            problems.append(
                Problem(
                    "dataset",
                    "only GPT datasets (indexed or mock) and fine-tuning datasets can be trained on yet",
                    type(self.dataset).__name__,
                    fix=f"use dataset._target_: {GPTDatasetConfig.target()} (or the mock dataset, or "
                    f"{FinetuningDatasetConfig.target()})",
                )
            )
        if self.peft is not None and "peft" not in broken:
            problems += self._peft_problems(broken)
        return problems

    def _t5_problems(self, broken: set[str]) -> list[Problem]:
        """What the loop cannot run for a T5 model: other data than span corruption, PEFT (adapters
        are built for decoder-only models). Its provider refuses context and pipeline parallelism;
        tensor (and sequence) parallelism and activation recompute run."""
        problems: list[Problem] = []
        if not isinstance(self.dataset, T5DatasetConfig):
            problems.append(
                Problem(
                    "dataset",
                    "a T5 model trains on span-corruption data (encoder and decoder sequences)",
                    type(self.dataset).__name__,
                    fix=f"use dataset._target_: {T5DatasetConfig.target()} (dataset=t5, or dataset=mock_t5)",
                )
            )
        if self.peft is not None:
            problems.append(
                Problem(
                    "peft",
                    "PEFT adapters are built for decoder-only (GPT-family) models",
                    type(self.peft).__name__,
                    fix="set peft=null",
                )
            )
        return problems

    def _peft_problems(self, broken: set[str]) -> list[Problem]:
        """PEFT settings the run cannot honour: targets matching no layer of the whole model (a
        pipeline rank holds only part of it, so they are checked here), and what adapter-only
        checkpoints rule out."""
        from viaduct.peft.dora import DoRA
        from viaduct.peft.lora import LoRA
        from viaduct.peft.transform import planned_adapters

        problems: list[Problem] = []
        peft = self.peft
        if not isinstance(peft, (LoRA, DoRA)):
            return [
                Problem("peft", "only LoRA and DoRA can be trained", type(peft).__name__, fix="use peft=lora")
            ]
        if isinstance(self.model, GPTModelProvider) and "model" not in broken:
            try:
                planned = planned_adapters(peft, self.model)
            except ConfigError as exc:
                problems += exc.problems
            else:
                problems += _stages_without_adapters(self.model, planned)
        if self.checkpoint.also_save_hf_checkpoint:
            problems.append(
                Problem(
                    "checkpoint.also_save_hf_checkpoint",
                    "a PEFT run saves adapters only, and a Hugging Face model has no place for them",
                    True,
                    fix="set it to false; export with `viaduct peft merge CKPT --hf OUT` (merged model) "
                    "or `viaduct peft export-adapter CKPT OUT` (Hugging Face PEFT adapter)",
                )
            )
        return problems

    def _env_var_problems(self, broken: set[str]) -> list[Problem]:
        problems: list[Problem] = []
        if "env_vars" in broken:
            return problems
        for name, value in self.env_vars.items():
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                problems.append(
                    Problem(
                        "env_vars",
                        f"{name!r} is not an environment variable name",
                        name,
                        fix="use non-empty names without '=' (e.g. CUDA_DEVICE_MAX_CONNECTIONS)",
                    )
                )
            elif "\0" in str(value):
                problems.append(
                    Problem(
                        f"env_vars.{name}",
                        "an environment variable cannot hold a NUL character",
                        value,
                        fix=f"remove the NUL from env_vars.{name}",
                    )
                )
        return problems

    def _warn_if_nothing_to_evaluate(self) -> None:
        """Evaluation asked for (train.eval_iters > 0) on a validation split that gets no data."""
        ds, t = self.dataset, self.train
        if not isinstance(ds, GPTDatasetConfig) or t.eval_iters <= 0:
            return
        if ds.blend_per_split is not None:
            empty = [name for name, blend in zip(_SPLITS, ds.blend_per_split) if blend is None]
            where, fix = "dataset.blend_per_split", "name validation data in dataset.blend_per_split[1]"
        else:
            matrix = ds.split_matrix or []
            empty = [name for name, share in zip(_SPLITS, matrix) if share is None]
            where = f"dataset.split={ds.split!r}" if ds.split is not None else "dataset.split"
            fix = 'give validation a share in dataset.split (e.g. "969,30,1")'
        if "validation" not in empty:
            return
        when = (
            f"every {t.eval_interval} steps (train.eval_interval) and after training"
            if t.eval_interval is not None
            else "after training"
        )
        lost = [name for name in ("validation", "test") if name in empty]
        warn(
            f"{where} leaves the {' and '.join(lost)} split{'s' * (len(lost) > 1)} empty, but "
            f"train.eval_iters={t.eval_iters} asks for evaluation {when}: the run does no "
            f"{' or '.join(lost)} evaluation. Fix: {fix}, or set train.eval_iters=0 to train "
            "without evaluation"
        )

    def _with_sources(self, problems: list[Problem]) -> list[Problem]:
        sources = None
        out = []
        for p in problems:
            if p.source is None and p.path:
                if sources is None:
                    sources = self.provenance()
                src = sources.get(p.path.split("[", 1)[0])
                if src is not None and src != "default":
                    from dataclasses import replace

                    p = replace(p, source=src)
            out.append(p)
        return out

    # ------------------------------------------------------------------ helpers

    def get_data_parallel_size(self, world_size: int) -> int:
        """world_size / (TP·PP·CP); raises `ConfigError` when it does not divide."""
        problems = self._data_parallel_size(world_size)
        if problems:
            raise ConfigError(problems)
        return world_size // (
            self.model.tensor_model_parallel_size
            * self.model.pipeline_model_parallel_size
            * self.model.context_parallel_size
        )

    def log_non_default_values(self) -> dict[str, Any]:
        """Dotted path -> value for every field not at its default (what this run changed)."""
        from viaduct.config.diff import non_default_values

        return non_default_values(self)


def _stages_without_adapters(model: GPTModelProvider, adapted: Iterable[str]) -> list[Problem]:
    """A pipeline rank whose layers get no adapter would have nothing to train (and no optimizer)."""
    if model.pipeline_model_parallel_size <= 1:
        return []
    from viaduct.distributed.pipeline_split import pipeline_stages

    try:
        stages = pipeline_stages(model)
    except ConfigError:
        return []  # the split's own problems are reported with the model's
    layers = {int(name.split(".")[2]) for name in adapted}
    empty = sorted({s.pp_rank for s in stages} - {s.pp_rank for s in stages if layers.intersection(s.layers)})
    if not empty:
        return []
    return [
        Problem(
            "peft.target_modules",
            f"adapts no layer held by pipeline rank(s) {empty}, which would then have nothing to train",
            model.pipeline_model_parallel_size,
            fix="target modules in every stage's layers (e.g. linear_qkv), or lower "
            "model.pipeline_model_parallel_size",
        )
    ]


def _saved_tokenizer(source: str) -> TokenizerConfig | None:
    """The tokenizer of the viaduct checkpoint `source` names (None when it is not one, or its
    configuration cannot be read: loading it then reports what is wrong)."""
    from pathlib import Path

    from viaduct.training.checkpoint import layout
    from viaduct.training.checkpoint.config_check import load_saved_config
    from viaduct.training.checkpoint.rank0_files import with_saved_tokenizer_files
    from viaduct.training.checkpoint.resolve import find_checkpoint

    try:
        found = find_checkpoint(
            Path(source).expanduser(), "checkpoint.pretrained_checkpoint", None, verbose=False
        )
        if found is None or not (found / layout.RUN_CONFIG).is_file():
            return None
        tokenizer = load_saved_config(found / layout.RUN_CONFIG).tokenizer
    except (ValueError, OSError):
        return None
    if tokenizer is None or tokenizer.tokenizer_type is None:
        return None
    with_saved_tokenizer_files(tokenizer, found)
    return tokenizer
