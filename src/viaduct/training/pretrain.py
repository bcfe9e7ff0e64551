"""`pretrain(config, forward_step_func)` and `finetune(...)`: a whole training job.

1. Validate the config (nothing touches the disk or the network before this passes); validation
   also refuses every setting this version cannot run, so the run re-checks nothing.
2. Set up: `env_vars` into the environment (a variable already set wins), process group from the
   torchrun environment, seeds, tokenizer (the model's vocabulary follows it when unset), model
   (built on its device, compiled on CUDA), optimizer, DDP wrapper, scheduler, checkpoint load,
   data iterators, logger, timers, signal handler, profiler.
3. Train (`viaduct.training.train`), evaluate on the validation set, run the test pass.
4. Shut down what was created — also after an error (process groups are aborted then).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from viaduct.config import ConfigError, Problem
from viaduct.data.loaders import (
    build_train_valid_test_data_iterators,
    build_train_valid_test_datasets,
    get_sample_counts,
)
from viaduct.data.tokenizers import Tokenizer, build_tokenizer
from viaduct.distributed.ddp import wrap_data_parallel
from viaduct.distributed.init import DistributedContext, destroy_distributed, initialize_distributed
from viaduct.distributed.layout import layout_of
from viaduct.distributed.mesh import ParallelMesh, build_mesh
from viaduct.models.accounting import flops_per_token, peak_flops, trainable_parameters
from viaduct.models.compile import compile_model
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.models.t5.provider import T5ModelProvider
from viaduct.training.callbacks import Callback, CallbackManager
from viaduct.training.checkpoint.checkpointer import Checkpointer
from viaduct.training.checkpoint.lock import lock_save_dir
from viaduct.training.config import ConfigContainer
from viaduct.training.fault_tolerance import FaultTolerance, rank_from_env
from viaduct.training.forward_contract import ForwardStepFunc, LossFunc, prepare_forward_step
from viaduct.training.gpt_step import forward_step as default_forward_step
from viaduct.training.logging import ProgressFile, TrainingLogger, write_config_file
from viaduct.training.logging.setup import setup_python_logging, teardown_python_logging
from viaduct.training.logging.timers import Timers
from viaduct.training.microbatches import MicroBatchCalculator
from viaduct.training.optim import build_optimizer
from viaduct.training.outputs import check_outputs
from viaduct.training.profiling import Profiler
from viaduct.training.rerun import RerunStateMachine, validation_log_path
from viaduct.training.rng import set_random_seed
from viaduct.training.scheduler import build_scheduler
from viaduct.training.signals import DistributedSignalHandler
from viaduct.training.state import GlobalState
from viaduct.training.straggler import build_straggler_detection, time_forward_step
from viaduct.training.train import RNGSnapshot, TrainContext, run_evaluation, train
from viaduct.training.train_step import StepGroups

if TYPE_CHECKING:
    from viaduct.distributed.pipeline import Pipeline

log = logging.getLogger("viaduct")

Callbacks = Iterable[Callback | Mapping[str, Callable[..., Any]]] | None
Resources = list[Callable[[], object]]
"""What `_run` closes at the end, last created first."""

T = TypeVar("T")


def _check(cfg: ConfigContainer) -> None:
    # validate() holds every configuration rule the run depends on: what `viaduct config validate`
    # accepts, the run accepts. Only what depends on files or the machine is found at setup.
    if not isinstance(cfg, ConfigContainer):
        raise TypeError(f"pretrain() needs a ConfigContainer, got {type(cfg).__name__}")
    cfg.validate()


def apply_env_vars(env_vars: Mapping[str, str | int | float | bool]) -> dict[str, str]:
    """Set each of `env_vars` in os.environ unless it is already set (the launcher's value wins).

    Returns the variables it set. Values become strings as `str()` writes them (True -> "True").
    """
    added: dict[str, str] = {}
    for name, value in env_vars.items():
        if name not in os.environ:
            os.environ[name] = added[name] = str(value)
    return added


def pretrain(
    config: ConfigContainer,
    forward_step_func: Callable[..., Any] | None = None,
    callbacks: Callbacks = None,
) -> GlobalState:
    """Train as `config` says; returns the final `GlobalState` (train state, how the run ended, final losses).

    `forward_step_func` defaults to `viaduct.training.gpt_step.forward_step`.
    """
    _check(config)
    callbacks = _reusable(callbacks)
    return _restartable(
        config, lambda: _run(GlobalState(cfg=config), forward_step_func, CallbackManager(callbacks))
    )


def finetune(
    config: ConfigContainer,
    forward_step_func: Callable[..., Any] | None = None,
    callbacks: Callbacks = None,
) -> GlobalState:
    """`pretrain` that must start from a checkpoint (`checkpoint.pretrained_checkpoint` or `load`)."""
    if not config.checkpoint.pretrained_checkpoint and not config.checkpoint.load:
        raise ConfigError(
            Problem(
                "checkpoint.pretrained_checkpoint",
                "finetune() needs weights to start from",
                None,
                fix="set checkpoint.pretrained_checkpoint (or checkpoint.load to resume a fine-tuning run)",
            )
        )
    _check(config)
    callbacks = _reusable(callbacks)
    return _restartable(
        config,
        lambda: _run(
            GlobalState(cfg=config), forward_step_func, CallbackManager(callbacks), require_checkpoint=True
        ),
    )


def _reusable(callbacks: Callbacks) -> Callbacks:
    """`callbacks` as a list: an in-process restart hands them to each attempt, and a generator runs out."""
    return None if callbacks is None else list(callbacks)


def _restartable(config: ConfigContainer, attempt: Callable[[], GlobalState]) -> GlobalState:
    """`attempt()` (one whole run, from a fresh state), re-entered after faults under inprocess_restart."""
    ipr = config.inprocess_restart
    if ipr is None or not ipr.enabled:
        return attempt()
    from viaduct.training.inprocess_restart import run_with_restarts

    return run_with_restarts(ipr, attempt)


def _run(
    state: GlobalState,
    forward_step_func: Callable[..., Any] | None,
    callbacks: CallbackManager,
    *,
    require_checkpoint: bool = False,
) -> GlobalState:
    cfg = state.cfg
    setup_python_logging(cfg.logger)
    resources: Resources = [teardown_python_logging]
    failed = True
    context: TrainContext | None = None
    try:
        ft = _start_fault_tolerance(cfg, resources)  # first: a hang in any later setup step is caught
        # Before the process group: NCCL and CUDA read their variables when they start.
        added = apply_env_vars(cfg.env_vars)
        if added:
            log.info("set environment variables from env_vars: %s", ", ".join(sorted(added)))
        state.dist = initialize_distributed(cfg.dist)
        if ft is not None:
            ft.connect(state.dist)
        context = _setup(
            state, forward_step_func, callbacks, resources, require_checkpoint=require_checkpoint
        )
        context.fault_tolerance = ft
        _train_and_evaluate(state, context)
        if ft is not None:
            ft.update_timeouts()  # with what the whole run observed (every rank gets here)
        failed = False
    finally:
        for close in reversed(resources):
            try:
                close()
            except Exception:  # keep closing the others; an error already on its way matters more
                if not failed:
                    raise
        context = None  # the DDP wrapper and its hooks hold the process group: free them first
        gc.collect()
        if state.dist is not None:
            destroy_distributed(state.dist, abort=failed)
    if state.exit_code:
        # The rerun state machine's exit codes (16: resume on other hardware; 17: a reproduced fatal
        # result) are for the job scheduler: the process ends with them, after a clean shutdown.
        log.error("%s", state.exit_reason)
        raise SystemExit(state.exit_code)
    return state


def _start_fault_tolerance(cfg: ConfigContainer, resources: Resources) -> FaultTolerance | None:
    """ft.enable_ft_package's hang watchdog, started in the "setup" section; None when it is off."""
    if cfg.ft is None or not cfg.ft.enable_ft_package or not cfg.checkpoint.save:
        return None  # validate() refuses enable_ft_package without checkpoint.save
    ft = FaultTolerance(cfg.ft, cfg.checkpoint.save, rank=rank_from_env())
    resources.append(ft.close)
    return ft


def _setup(
    state: GlobalState,
    forward_step_func: Callable[..., Any] | None,
    callbacks: CallbackManager,
    resources: Resources,
    *,
    require_checkpoint: bool,
) -> TrainContext:
    cfg, ctx = state.cfg, state.dist
    if ctx is None:
        raise ValueError("_setup() needs the process group: call initialize_distributed() first")
    train_cfg = cfg.train
    # validate() (run by pretrain() first) sets these and refuses any model but a GPT or T5 one.
    model_cfg = cfg.model
    if not isinstance(model_cfg, (GPTModelProvider, T5ModelProvider)):
        raise TypeError(f"pretrain() trains GPT and T5 models, got {type(model_cfg).__name__}")
    train_iters = _validated(train_cfg.effective_train_iters, "train.effective_train_iters")
    global_batch_size = _validated(train_cfg.global_batch_size, "train.global_batch_size")
    micro_batch_size = _validated(train_cfg.micro_batch_size, "train.micro_batch_size")
    eval_global_batch_size = _validated(
        train_cfg.effective_eval_global_batch_size, "train.effective_eval_global_batch_size"
    )
    eval_micro_batch_size = _validated(
        train_cfg.effective_eval_micro_batch_size, "train.effective_eval_micro_batch_size"
    )
    setup_start = time.time()
    # Output paths and the checkpoint-directory lock: before anything is written.
    check_outputs(cfg, ctx)  # every unwritable output at once, not at the first save
    save_lock = lock_save_dir(cfg, ctx)  # a second run saving into the same directory stops here
    if save_lock is not None:
        resources.append(save_lock.release)
    write_config_file(cfg, rank=ctx.rank)
    progress = ProgressFile.from_config(cfg, rank=ctx.rank)
    if progress is not None:
        progress.job_start(state.train_state.step, ctx.world_size)

    tensorboard_dir = cfg.logger.tensorboard_dir
    trace_dir = (
        os.path.join(os.path.dirname(os.path.abspath(tensorboard_dir)), "torch_profile")
        if tensorboard_dir
        else None
    )
    profiler = Profiler(
        cfg.profiling, rank=ctx.rank, trace_dir=trace_dir, device=ctx.device, world_size=ctx.world_size
    )
    resources.append(profiler.close)
    profiler.start_run()
    if _cuda_graphs(cfg) and ctx.device.type != "cuda":
        raise ConfigError(
            Problem(
                "model.cuda_graph_impl",
                f"CUDA graphs need a CUDA device, but this run is on {ctx.device.type}",
                "local",
                fix="run on a GPU, or set model.cuda_graph_impl=none",
            )
        )
    pmesh = build_mesh(layout_of(cfg, ctx.world_size), ctx.device)
    ctx.parallel = pmesh
    layout = pmesh.layout
    set_random_seed(
        cfg.rng.seed, dp_rank=pmesh.dp_rank, data_parallel_random_init=cfg.rng.data_parallel_random_init
    )

    # Tokenizer first: an unset model vocabulary follows it.
    # Rank 0 builds what gets cached on disk (built-in tokenizer, dataset indices) before the others.
    tokenizer = _rank0_first(ctx, lambda: build_tokenizer(cfg.tokenizer))
    state.tokenizer = tokenizer
    _sync_vocab(cfg, tokenizer)

    model: nn.Module
    trained_model: nn.Module
    if isinstance(model_cfg, T5ModelProvider):
        model, pipeline = _build_t5(cfg, model_cfg, pmesh, ctx), None
        trained_model = model if layout.uses_fsdp else _compiled(cfg, ctx, model, scope="model")
    else:
        model, trained_model, pipeline = _build_model(cfg, model_cfg, pmesh, ctx)
    if layout.pp > 1:
        # Built from the shared seed (a stage's weights are the same layers' in one process); from
        # here on each stage draws from its own stream (dropout), as Megatron seeds them.
        set_random_seed(
            cfg.rng.seed,
            pp_rank=pmesh.pp_rank,
            dp_rank=pmesh.dp_rank,
            data_parallel_random_init=cfg.rng.data_parallel_random_init,
        )
    optimizer = build_optimizer(cfg.optimizer, model, fp32_main_grads=cfg.ddp.grad_reduce_in_fp32)
    if pipeline is not None:
        optimizer.pipeline_group = pmesh.pp_group
        optimizer.counted_elsewhere = pipeline.counted_elsewhere()
    scheduler = build_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(cfg, ctx)
    resources.append(checkpointer.finalize)
    loaded = checkpointer.load(
        model=model, optimizer=optimizer, scheduler=scheduler, train_state=state.train_state
    )
    if loaded is None and require_checkpoint:
        raise ConfigError(
            Problem(
                "checkpoint.load",
                "finetune() needs a checkpoint, and this directory holds none",
                cfg.checkpoint.load,
                fix="point checkpoint.load at a directory with a checkpoint, "
                "or set checkpoint.pretrained_checkpoint",
            )
        )
    # The streams the first step must see (seeded, or the checkpoint's): the loop returns to them.
    rng_at_start = RNGSnapshot.capture(ctx.device)
    rerun = RerunStateMachine(
        cfg.rerun_state_machine,
        capture_rng=lambda: RNGSnapshot.capture(ctx.device),
        rank=ctx.rank,
        group=ctx.host_group,
        distributed=ctx.distributed,
        host_device=ctx.host_device,
        log_path=validation_log_path(cfg),
    )
    rerun.load_checkpoint_state(checkpointer.loaded_rerun_state, str(cfg.checkpoint.load))

    per_token = model_cfg.calculate_per_token_loss
    if ctx.distributed and not layout.uses_fsdp:
        trained_model = wrap_data_parallel(trained_model, cfg.ddp, optimizer, ctx, per_token_loss=per_token)

    dp = pmesh.dp_size
    train_state = state.train_state
    train_samples, valid_samples, test_samples = get_sample_counts(cfg)
    if ctx.distributed:
        # Rank 0 builds the dataset index caches first; the other ranks then read them.
        counts = (train_samples, valid_samples, test_samples)
        _rank0_only_first(ctx, lambda: build_train_valid_test_datasets(cfg, tokenizer, counts))
    train_iterator, valid_iterator, test_iterator = build_train_valid_test_data_iterators(
        cfg,
        tokenizer,
        dp_rank=pmesh.dp_rank,
        dp_size=dp,
        consumed_train_samples=train_state.consumed_train_samples,
        consumed_valid_samples=train_state.consumed_valid_samples,
        train_samples=train_samples,
        valid_samples=valid_samples,
        test_samples=test_samples,
        exit_signal=train_cfg.exit_signal if train_cfg.exit_signal_handler_for_dataloader else None,
    )
    if layout.cp > 1:
        from viaduct.distributed.context_parallel import ContextParallelBatches

        # Each context-parallel rank reads the same samples and keeps its share of their tokens.
        train_iterator, valid_iterator, test_iterator = (
            None if it is None else ContextParallelBatches(it, layout.cp, pmesh.cp_rank)
            for it in (train_iterator, valid_iterator, test_iterator)
        )
    train_state.do_train = train_iterator is not None and train_iters > 0
    train_state.do_valid = valid_iterator is not None and train_cfg.eval_iters > 0
    train_state.do_test = test_iterator is not None and train_cfg.eval_iters > 0

    seq_length = model_cfg.seq_length
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
    state.timers = Timers(
        cfg.logger.timing_log_level, cfg.logger.timing_log_option, cfg.logger.barrier_with_L1_time
    )
    state.logger = TrainingLogger(
        cfg,
        rank=ctx.rank,
        world_size=ctx.world_size,
        train_iters=train_iters,
        peak_flops_per_device=peak_flops(device_name) if device_name else None,
        device=ctx.device,
        start_step=train_state.step,
    )
    resources.append(state.logger.close)
    if train_cfg.exit_signal_handler:
        handler = DistributedSignalHandler(train_cfg.exit_signal)
        handler.__enter__()
        state.signal_handler = handler
        resources.append(lambda: handler.__exit__(None, None, None))

    microbatches = MicroBatchCalculator(
        global_batch_size,
        micro_batch_size,
        dp,
        train_cfg.rampup_batch_size,
        train_cfg.decrease_batch_size_if_needed,
    )
    microbatches.update(train_state.consumed_train_samples)
    if isinstance(model_cfg, T5ModelProvider):
        from viaduct.models.t5.provider import t5_flops_per_sample
        from viaduct.training.t5_step import forward_step as t5_forward_step

        default_step, flops_per_sample = t5_forward_step, t5_flops_per_sample(model_cfg)
        tokens_per_sample = model_cfg.seq_length + model_cfg.seq_length_dec  # encoder and decoder
    else:
        default_step = default_forward_step
        fpt = flops_per_token(model_cfg, seq_length, trainable=trainable_parameters(cfg))
        flops_per_sample, tokens_per_sample = fpt * seq_length, seq_length
    stragglers = build_straggler_detection(cfg, ctx, resources)  # none unless configured: no cost
    callbacks.callbacks.extend(stragglers)  # built-in callbacks, after the user's
    context = TrainContext(
        forward_step=time_forward_step(
            _cuda_graph_steps(cfg, prepare_forward_step(forward_step_func or default_step, state)),
            stragglers,
        ),
        trained_model=trained_model,
        plain_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_iterator=train_iterator,
        valid_iterator=valid_iterator,
        test_iterator=test_iterator,
        microbatches=microbatches,
        train_iters=train_iters,
        eval_global_batch_size=eval_global_batch_size,
        eval_num_microbatches=max(1, eval_global_batch_size // (eval_micro_batch_size * dp)),
        flops_per_sample=flops_per_sample,
        tokens_per_sample=tokens_per_sample,
        callbacks=callbacks,
        profiler=profiler,
        checkpointer=checkpointer,
        progress_file=progress,
        per_token_loss=per_token,
        rng_at_start=rng_at_start,
        step_groups=_step_groups(pmesh),
        pipeline=pipeline,
        micro_batch_size=micro_batch_size,
        eval_micro_batch_size=eval_micro_batch_size,
        rerun=rerun,
        stragglers=stragglers,
    )
    n_params = sum(p.numel() for p in model.parameters())
    state.logger.info(
        f"model: {n_params / 1e6:.2f}M parameters on {ctx.device} ({model_cfg.params_dtype}); "
        f"world size {ctx.world_size}: {layout.describe()}; {microbatches.num_microbatches} micro-batches "
        f"of {micro_batch_size} per step; setup took {time.time() - setup_start:.1f} s"
    )
    return context


def _validated(value: int | None, field: str) -> int:
    """A setting that `validate()` sets or derives; unset only when validate() was skipped."""
    if value is None:
        raise ValueError(f"{field} is unset: call cfg.validate() before building the run")
    return value


def _rank0_first(ctx: DistributedContext, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks, which then find rank 0's cached files."""
    if not ctx.distributed:
        return fn()
    if ctx.rank == 0:
        result = fn()
        dist.barrier(group=ctx.host_group)
        return result
    dist.barrier(group=ctx.host_group)
    return fn()


def _rank0_only_first(ctx: DistributedContext, fn: Callable[[], object]) -> None:
    """Run `fn` on rank 0 while the other ranks wait (they read what it cached afterwards)."""
    if ctx.rank == 0:
        fn()
    dist.barrier(group=ctx.host_group)


def _sync_vocab(cfg: ConfigContainer, tokenizer: Tokenizer) -> None:
    """The model's vocabulary follows the tokenizer when unset or when asked to (Megatron's policy)."""
    model_cfg = cfg.model
    if model_cfg.vocab_size is None or cfg.tokenizer.use_tokenizer_vocab_size:
        model_cfg.derive("vocab_size", tokenizer.vocab_size, f"tokenizer ({cfg.tokenizer.tokenizer_type})")
    elif model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            Problem(
                "model.vocab_size",
                f"is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size} tokens)",
                model_cfg.vocab_size,
                fix="unset model.vocab_size (it then follows the tokenizer) or raise it",
            )
        )


def _compile_enabled(cfg: ConfigContainer, ctx: DistributedContext) -> bool:
    flag = cfg.train.torch_compile
    if flag is not None:
        return flag
    # Unset: compiled on GPUs, except under a zero-bubble pipeline schedule, which splits each
    # backward pass into its input and weight halves and cannot split a compiled graph.
    layout = ctx.parallel.layout if ctx.parallel is not None else None
    zero_bubble = layout is not None and layout.schedule == "interleaved_zero_bubble"
    return ctx.device.type == "cuda" and not zero_bubble


def _build_model(
    cfg: ConfigContainer, provider: GPTModelProvider, pmesh: ParallelMesh, ctx: DistributedContext
) -> tuple[nn.Module, nn.Module, Pipeline | None]:
    """(the model as checkpoints see it, what runs forward and backward, the pipeline that runs this
    rank's stages or None): the same module under FSDP, which shards it in place; compiled in place
    otherwise (DDP wraps it later). With pipeline stages, the model is this rank's chunks."""
    compile_layers = _compile_enabled(cfg, ctx)
    if pmesh.layout.pp > 1:
        from viaduct.distributed.parallelize import build_pipeline
        from viaduct.distributed.pipeline import PipelineChunks

        pipeline = build_pipeline(cfg, provider, pmesh, ctx.device, compile_layers=compile_layers)
        chunks = PipelineChunks(pipeline.chunks)
        return chunks, chunks, pipeline
    if pmesh.layout.uses_fsdp:
        from viaduct.distributed.parallelize import build_parallel_model

        model = build_parallel_model(cfg, provider, pmesh, ctx.device, compile_layers=compile_layers)
        return model, model, None
    model = provider.provide(device=ctx.device)
    if cfg.peft is not None:
        cfg.peft(model, training=True)  # before compile and DDP: they see the adapted model
    # Under DDP, per-layer graphs let gradient buckets be reduced while backward still runs.
    scope = cfg.train.torch_compile_scope or ("layers" if ctx.distributed else "model")
    return model, _compiled(cfg, ctx, model, scope=scope), None


def _build_t5(
    cfg: ConfigContainer, provider: T5ModelProvider, pmesh: ParallelMesh, ctx: DistributedContext
) -> nn.Module:
    """The T5 model on this rank's device. Under FSDP (sharded data parallelism, and always with tensor
    parallelism, whose data-parallel part FSDP does) kept in float32 and, in the order of
    `viaduct.distributed.parallelize`, split over the tensor-parallel ranks, compiled per layer, then
    sharded per layer. Every rank builds the whole model from the shared seed first, so each keeps
    exactly its part of the weights one process would have."""
    from viaduct.models.gpt.model import draw_init_seed

    seed = draw_init_seed()
    model = provider.provide(device=ctx.device, init_seed=seed)
    if any(p.is_meta for p in model.parameters()):  # init_model_with_meta_device: allocate, then init
        model.to_empty(device=ctx.device)
        model.init_weights(seed)
    layout = pmesh.layout
    if layout.uses_fsdp:
        from viaduct.distributed.parallelize import apply_fsdp

        model.float()
        compile_layers = _compile_enabled(cfg, ctx)
        if layout.tp > 1:
            from viaduct.distributed.parallelize import enable_async_tensor_parallel
            from viaduct.distributed.t5_parallel import apply_t5_tensor_parallel

            apply_t5_tensor_parallel(model, pmesh.tp_mesh, sequence_parallel=layout.sequence_parallel)
            if provider.tp_comm_overlap:
                enable_async_tensor_parallel(pmesh.tp_mesh, ctx.device, compiled=compile_layers)
        if compile_layers:
            compile_model(model, scope="layers")
        apply_fsdp(model, cfg, pmesh, sum_gradients=provider.calculate_per_token_loss)
    return model


def _compiled(
    cfg: ConfigContainer, ctx: DistributedContext, model: nn.Module, *, scope: Literal["model", "layers"]
) -> nn.Module:
    """`model` compiled in place when the run compiles (`_compile_enabled`), else as it is; with
    model.cuda_graph_impl=local, in the mode that replays CUDA graphs of the compiled code."""
    if not _compile_enabled(cfg, ctx):
        return model
    if _cuda_graphs(cfg):
        return compile_model(model, scope=scope, mode="reduce-overhead")
    return compile_model(model, scope=scope)


def _cuda_graphs(cfg: ConfigContainer) -> bool:
    """Whether the run replays CUDA graphs (validation allows it on one process that compiles)."""
    return getattr(cfg.model, "cuda_graph_impl", "none") == "local"


def _cuda_graph_steps(cfg: ConfigContainer, forward_step: ForwardStepFunc) -> ForwardStepFunc:
    """`forward_step`, marking each micro-batch as a new step of torch.compile's CUDA graphs: the last
    micro-batch's graph outputs (its loss reduced, its backward run) may then be overwritten. torch
    guesses these boundaries in training (a forward after a backward) but not across evaluation's
    forward-only passes."""
    if not _cuda_graphs(cfg):
        return forward_step

    def step(data_iterator: Iterator[Any], model: nn.Module) -> tuple[Any, LossFunc]:
        torch.compiler.cudagraph_mark_step_begin()
        return forward_step(data_iterator, model)

    return step


def _step_groups(pmesh: ParallelMesh) -> StepGroups:
    layout = pmesh.layout
    if pmesh.mesh is None:
        return StepGroups()
    return StepGroups(
        token_group=pmesh.step_token_group,
        cp_group=pmesh.cp_group if layout.cp > 1 else None,
        cp_size=layout.cp,
        defer_grad_sync=not layout.sync_grads_every_microbatch,
    )


def _train_and_evaluate(state: GlobalState, context: TrainContext) -> None:
    train_cfg, train_state = state.cfg.train, state.train_state
    if not train_cfg.skip_train and train_state.do_train and train_state.step < context.train_iters:
        train(state, context)
    if state.exit_reason:
        return  # an exit condition stops the job without the final evaluation
    eval_interval = train_cfg.eval_interval
    already = (
        eval_interval is not None
        and train_state.step % eval_interval == 0
        and train_state.step > 0
        and not train_cfg.skip_train
    )
    if train_state.do_valid and not already:
        state.final_validation = run_evaluation(state, context, "validation")
    if train_state.do_test:
        state.final_test = run_evaluation(state, context, "test")
