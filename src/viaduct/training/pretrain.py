"""`pretrain(config, forward_step_func)` and `finetune(...)`: a whole training job (spec §5).

1. Validate the config (nothing touches the disk or the network before this passes) and check
   that this version can run every setting it asks for.
2. Set up: process group from the torchrun environment, seeds, tokenizer (the model's vocabulary
   follows it when unset), model (built on its device, compiled on CUDA), optimizer, DDP wrapper,
   scheduler, checkpoint load, data iterators, logger, timers, signal handler, profiler.
3. Train (`viaduct.training.train`), evaluate on the validation set, run the test pass.
4. Shut down what was created — also after an error (process groups are aborted then).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from viaduct.config import ConfigError, Problem
from viaduct.training.callbacks import Callback, CallbackManager
from viaduct.training.config import ConfigContainer
from viaduct.training.forward_step import prepare_forward_step
from viaduct.training.state import GlobalState

log = logging.getLogger("viaduct")

Callbacks = Iterable[Callback | Mapping[str, Callable[..., Any]]] | None


def runtime_problems(cfg: ConfigContainer) -> list[Problem]:
    """Settings that validate() accepts but this version of the training loop cannot run yet."""
    from viaduct.models.gpt.provider import GPTModelProvider

    problems: list[Problem] = []
    m = cfg.model
    if not isinstance(m, GPTModelProvider):
        problems.append(
            Problem("model", "only GPT models can be trained yet", type(m).__name__, fix="use a GPT provider")
        )
    for name, what in (
        ("tensor_model_parallel_size", "tensor parallelism"),
        ("pipeline_model_parallel_size", "pipeline parallelism"),
        ("context_parallel_size", "context parallelism"),
        ("expert_model_parallel_size", "expert parallelism"),
    ):
        value = getattr(m, name, 1)
        if value not in (None, 1):
            problems.append(
                Problem(
                    f"model.{name}",
                    f"{what} is not supported yet by pretrain()",
                    value,
                    fix=f"set model.{name}=1 (data parallelism over all ranks is supported)",
                )
            )
    if getattr(m, "virtual_pipeline_model_parallel_size", None) is not None:
        problems.append(
            Problem(
                "model.virtual_pipeline_model_parallel_size",
                "pipeline parallelism is not supported yet by pretrain()",
                m.virtual_pipeline_model_parallel_size,
                fix="remove model.virtual_pipeline_model_parallel_size",
            )
        )
    if getattr(cfg.dataset, "trust_remote_code", None) is not None:
        problems.append(
            Problem(
                "dataset.trust_remote_code",
                "applies to Hugging Face datasets, which are not supported yet",
                cfg.dataset.trust_remote_code,
                fix="remove dataset.trust_remote_code",
            )
        )
    if cfg.peft is not None:
        problems.append(
            Problem(
                "peft", "PEFT training is not supported yet", type(cfg.peft).__name__, fix="set peft=null"
            )
        )
    return problems


def _check(cfg: ConfigContainer) -> None:
    if not isinstance(cfg, ConfigContainer):
        raise TypeError(f"pretrain() needs a ConfigContainer, got {type(cfg).__name__}")
    cfg.validate()
    problems = runtime_problems(cfg)
    if problems:
        raise ConfigError(problems, header=f"cannot run this configuration ({len(problems)} problems)")


def pretrain(
    config: ConfigContainer,
    forward_step_func: Callable[..., Any] | None = None,
    callbacks: Callbacks = None,
) -> GlobalState:
    """Train as `config` says; returns the final `GlobalState` (train state, last losses).

    `forward_step_func` defaults to `viaduct.training.gpt_step.forward_step`.
    """
    _check(config)
    state = GlobalState(cfg=config)
    return _run(state, forward_step_func, CallbackManager(callbacks))


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
    state = GlobalState(cfg=config)
    state.user_state["checkpoint_load_required"] = True
    return _run(state, forward_step_func, CallbackManager(callbacks))


def _run(
    state: GlobalState, forward_step_func: Callable[..., Any] | None, callbacks: CallbackManager
) -> GlobalState:
    from viaduct.distributed.init import destroy_distributed, initialize_distributed
    from viaduct.training.logging.setup import setup_python_logging, teardown_python_logging

    cfg = state.cfg
    assert cfg is not None
    setup_python_logging(cfg.logger)
    resources: list[Any] = [teardown_python_logging]
    failed = True
    try:
        state.dist = initialize_distributed(cfg.dist)
        tc = _setup(state, forward_step_func, callbacks, resources)
        _train_and_evaluate(state, tc)
        failed = False
    finally:
        for close in reversed(resources):
            try:
                close()
            except Exception:  # keep closing the others; an error already on its way matters more
                if not failed:
                    raise
        tc = None  # the DDP wrapper and its hooks hold the process group: free them first
        gc.collect()
        if state.dist is not None:
            destroy_distributed(state.dist, abort=failed)
    return state


def _setup(
    state: GlobalState,
    forward_step_func: Callable[..., Any] | None,
    callbacks: CallbackManager,
    resources: list,
) -> Any:
    from viaduct.data.loaders import (
        build_train_valid_test_data_iterators,
        build_train_valid_test_datasets,
        get_sample_counts,
    )
    from viaduct.data.tokenizers import build_tokenizer
    from viaduct.distributed.ddp import wrap_data_parallel
    from viaduct.models.accounting import flops_per_token, peak_flops
    from viaduct.training.checkpointing import Checkpointer
    from viaduct.training.gpt_step import forward_step as default_forward_step
    from viaduct.training.logging import ProgressFile, TrainingLogger, write_config_file
    from viaduct.training.logging.timers import Timers
    from viaduct.training.microbatches import MicroBatchCalculator
    from viaduct.training.optim import build_optimizer
    from viaduct.training.profiling import Profiler
    from viaduct.training.rng import set_random_seed
    from viaduct.training.scheduler import build_scheduler
    from viaduct.training.signals import DistributedSignalHandler
    from viaduct.training.train import TrainContext

    cfg, ctx = state.cfg, state.dist
    assert cfg is not None and ctx is not None
    t0 = time.time()
    write_config_file(cfg, rank=ctx.rank)
    progress = ProgressFile.from_config(cfg, rank=ctx.rank)
    if progress is not None:
        progress.job_start(state.train_state.step, ctx.world_size)
        state.user_state["progress_file"] = progress

    tb = cfg.logger.tensorboard_dir
    trace_dir = os.path.join(os.path.dirname(os.path.abspath(tb)), "torch_profile") if tb else None
    profiler = Profiler(
        cfg.profiling, rank=ctx.rank, trace_dir=trace_dir, device=ctx.device, world_size=ctx.world_size
    )
    resources.append(profiler.close)
    profiler.start_run()
    set_random_seed(
        cfg.rng.seed, dp_rank=ctx.rank, data_parallel_random_init=cfg.rng.data_parallel_random_init
    )

    # Tokenizer first: an unset model vocabulary follows it.
    # Rank 0 builds what gets cached on disk (built-in tokenizer, dataset indices) before the others.
    tokenizer = _rank0_first(ctx, lambda: build_tokenizer(cfg.tokenizer))
    state.tokenizer = tokenizer
    _sync_vocab(cfg, tokenizer)

    model = cfg.model.provide(device=ctx.device)
    optimizer = build_optimizer(cfg.optimizer, model, fp32_main_grads=cfg.ddp.grad_reduce_in_fp32)
    scheduler = build_scheduler(cfg, optimizer)
    checkpointer = Checkpointer(cfg, ctx)
    resources.append(checkpointer.finalize)
    loaded = checkpointer.load(
        model=model, optimizer=optimizer, scheduler=scheduler, train_state=state.train_state
    )
    if loaded is None and state.user_state.get("checkpoint_load_required"):
        raise ConfigError(
            Problem(
                "checkpoint.load",
                "finetune() needs a checkpoint, and this directory holds none",
                cfg.checkpoint.load,
                fix="point checkpoint.load at a directory with a checkpoint, "
                "or set checkpoint.pretrained_checkpoint",
            )
        )

    trained = _compile(cfg, model, ctx)
    per_token = bool(getattr(cfg.model, "calculate_per_token_loss", False))
    if ctx.distributed:
        trained = wrap_data_parallel(trained, cfg.ddp, optimizer, ctx, per_token_loss=per_token)

    t = cfg.train
    dp = cfg.data_parallel_size or 1
    ts = state.train_state
    train_samples, valid_samples, test_samples = get_sample_counts(cfg)
    if ctx.distributed:
        # Rank 0 builds the dataset index caches first; the other ranks then read them.
        counts = (train_samples, valid_samples, test_samples)
        _rank0_first(ctx, lambda: build_train_valid_test_datasets(cfg, tokenizer, counts), others=False)
    train_it, valid_it, test_it = build_train_valid_test_data_iterators(
        cfg,
        tokenizer,
        dp_rank=ctx.rank,
        dp_size=dp,
        consumed_train_samples=ts.consumed_train_samples,
        consumed_valid_samples=ts.consumed_valid_samples,
        train_samples=train_samples,
        valid_samples=valid_samples,
        test_samples=test_samples,
        exit_signal=t.exit_signal if t.exit_signal_handler_for_dataloader else None,
    )
    state.user_state["test_iterator"] = test_it
    ts.do_train = train_it is not None and t.effective_train_iters > 0
    ts.do_valid = valid_it is not None and t.eval_iters > 0
    ts.do_test = test_it is not None and t.eval_iters > 0

    seq = cfg.model.seq_length
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
    state.timers = Timers(
        cfg.logger.timing_log_level, cfg.logger.timing_log_option, cfg.logger.barrier_with_L1_time
    )
    state.logger = TrainingLogger(
        cfg,
        rank=ctx.rank,
        world_size=ctx.world_size,
        train_iters=t.effective_train_iters,
        peak_flops_per_device=peak_flops(name) if name else None,
        device=ctx.device,
        start_step=ts.step,
    )
    resources.append(state.logger.close)
    if t.exit_signal_handler:
        handler = DistributedSignalHandler(t.exit_signal)
        handler.__enter__()
        state.signal_handler = handler
        resources.append(lambda: handler.__exit__(None, None, None))

    microbatches = MicroBatchCalculator(
        t.global_batch_size, t.micro_batch_size, dp, t.rampup_batch_size, t.decrease_batch_size_if_needed
    )
    microbatches.update(ts.consumed_train_samples)
    eval_mbs = t.effective_eval_micro_batch_size
    tc = TrainContext(
        forward_step=prepare_forward_step(forward_step_func or default_forward_step, state),
        model=trained,
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_iterator=train_it,
        valid_iterator=valid_it,
        microbatches=microbatches,
        eval_num_microbatches=max(1, t.effective_eval_global_batch_size // (eval_mbs * dp)),
        flops_per_sample=flops_per_token(cfg.model, seq) * seq,
        tokens_per_sample=seq,
        callbacks=callbacks,
        profiler=profiler,
        checkpointer=checkpointer,
        per_token_loss=per_token,
    )
    n_params = sum(p.numel() for p in model.parameters())
    state.logger.info(
        f"model: {n_params / 1e6:.2f}M parameters on {ctx.device} ({cfg.model.params_dtype}); "
        f"world size {ctx.world_size}, {microbatches.num_microbatches} micro-batches of {t.micro_batch_size} "
        f"per step; setup took {time.time() - t0:.1f} s"
    )
    return tc


def _rank0_first(ctx: Any, fn: Callable[[], Any], *, others: bool = True) -> Any:
    """Run `fn` on rank 0, then (unless `others` is False) on the other ranks, which then find
    rank 0's cached files."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as dist

    result = fn() if ctx.rank == 0 else None
    dist.barrier(group=ctx.host_group)
    return fn() if ctx.rank != 0 and others else result


def _sync_vocab(cfg: ConfigContainer, tokenizer: Any) -> None:
    """The model's vocabulary follows the tokenizer when unset or when asked to (Megatron's policy)."""
    m = cfg.model
    if m.vocab_size is None or cfg.tokenizer.use_tokenizer_vocab_size:
        m._derive("vocab_size", tokenizer.vocab_size, f"tokenizer ({cfg.tokenizer.tokenizer_type})")
    elif m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            Problem(
                "model.vocab_size",
                f"is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size} tokens)",
                m.vocab_size,
                fix="unset model.vocab_size (it then follows the tokenizer) or raise it",
            )
        )


def _compile(cfg: ConfigContainer, model: torch.nn.Module, ctx: Any) -> torch.nn.Module:
    t = cfg.train
    enabled = t.torch_compile if t.torch_compile is not None else ctx.device.type == "cuda"
    if not enabled:
        return model
    from viaduct.models.compile import compile_model

    # Under DDP, per-layer graphs let gradient buckets be reduced while backward still runs.
    scope = t.torch_compile_scope or ("layers" if ctx.distributed else "model")
    return compile_model(model, scope=scope)


def _train_and_evaluate(state: GlobalState, tc: Any) -> None:
    from viaduct.training.train import run_evaluation, train

    cfg, ts = state.cfg, state.train_state
    assert cfg is not None
    if not cfg.train.skip_train and ts.do_train and ts.step < cfg.train.effective_train_iters:
        train(state, tc)
    if state.user_state.get("exit_reason"):
        return  # an exit condition stops the job without the final evaluation
    eval_interval = cfg.train.eval_interval
    already = (
        eval_interval is not None
        and ts.step % eval_interval == 0
        and ts.step > 0
        and not cfg.train.skip_train
    )
    if ts.do_valid and not already:
        state.user_state["validation"] = run_evaluation(state, tc, "validation")
    if ts.do_test:
        state.user_state["test"] = run_evaluation(state, tc, "test")
