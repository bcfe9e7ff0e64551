"""The training loop: steps, logging, evaluation, checkpoints and exits.

The host never waits for the device inside a step: each step leaves its losses, grad norm and
loss scale on the device; they are copied to the host together every `logger.log_interval` steps
(one synchronisation per interval), and TensorBoard still gets a value for every step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from viaduct.distributed.init import set_timeout_after_init
from viaduct.training.callbacks import CallbackContext, CallbackManager
from viaduct.training.eval import evaluate
from viaduct.training.host_memory import keep_freed_host_memory
from viaduct.training.logging import IntervalTiming, StepRecord
from viaduct.training.microbatches import MicroBatchCalculator
from viaduct.training.optim import MixedPrecisionOptimizer
from viaduct.training.rerun import EXIT_CODE_RESUME_TO_DISAMBIGUATE, RerunExit, RerunStateMachine
from viaduct.training.state import GlobalState
from viaduct.training.step_checks import (
    WeightHashMismatchError,
    check_large_grads,
    check_losses,
    decide_exit,
    replica_group,
    weights_match_across_ranks,
)
from viaduct.training.train_step import StepGroups, train_step

if TYPE_CHECKING:
    from viaduct.distributed.pipeline import Pipeline
    from viaduct.training.checkpoint.checkpointer import Checkpointer
    from viaduct.training.fault_tolerance import FaultTolerance
    from viaduct.training.forward_contract import ForwardStepFunc
    from viaduct.training.logging import ProgressFile
    from viaduct.training.profiling import Profiler
    from viaduct.training.scheduler import OptimizerParamScheduler
    from viaduct.training.straggler import StragglerDetection

log = logging.getLogger("viaduct")


@dataclass
class RNGSnapshot:
    """The state of Python's, NumPy's and torch's global generators at one moment, held in memory.

    `pretrain()` captures it right after the seeds are set, the model is built and a checkpoint
    (with its RNG state) is loaded, and the loop returns to it right before its first step. Whatever
    setup draws in between (a DataLoader iterator drawing its workers' base seed, a compiler, a
    callback's `on_train_start`) then cannot shift the stream the first step's dropout masks come
    from, so a resumed run continues exactly where the saved one stopped.
    """

    python: tuple[Any, ...]
    numpy: dict[str, Any]
    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    """Only the training device's generator: reading every visible GPU's would create a CUDA context on
    each of them."""
    cuda_device: int | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RNGSnapshot:
        cuda = cuda_device = None
        if device.type == "cuda" and torch.cuda.is_available():
            cuda_device = device.index if device.index is not None else torch.cuda.current_device()
            cuda = torch.cuda.get_rng_state(cuda_device)
        return cls(
            python=random.getstate(),
            numpy=np.random.get_state(legacy=False),
            cpu=torch.get_rng_state(),
            cuda=cuda,
            cuda_device=cuda_device,
        )

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and self.cuda_device is not None:  # captured together
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


_OPTIONAL_METRICS = ("grad_norm", "num_zeros", "params_norm", "loss_scale")


@dataclass
class _HostMetrics:
    """A step's metrics read back on the host (see `_DeviceMetrics`)."""

    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    num_zeros: float | None = None
    params_norm: float | None = None
    loss_scale: float | None = None
    """None when there is no loss scaler."""
    layer_grad_norms: dict[str, float] | None = None
    """{"grad-norm/<layer>": norm} on the steps that measured them (log_l2_norm_grad_to_tensorboard)."""


@dataclass
class _DeviceMetrics:
    """A step's metrics still on the device, stacked into one flat float32 tensor, with the name of
    each value in it.

    Stacking copies the values at the step: the loss scale is changed in place by later steps. A log
    interval concatenates the stacked tensors of all its steps and copies them to the host at once.
    """

    values: torch.Tensor
    keys: list[tuple[str, str]]
    """(kind, name) of each value: ("loss", name), (one of _OPTIONAL_METRICS, ""), ("layer", layer)."""

    @classmethod
    def stack(
        cls,
        losses: dict[str, torch.Tensor],
        *,
        grad_norm: torch.Tensor | None = None,
        num_zeros: torch.Tensor | None = None,
        params_norm: torch.Tensor | None = None,
        loss_scale: torch.Tensor | None = None,
        layer_grad_norms: tuple[list[str], torch.Tensor] | None = None,
    ) -> _DeviceMetrics | None:
        """One device tensor of every value given; None when there is none."""
        keys: list[tuple[str, str]] = []
        parts: list[torch.Tensor] = []
        for name in sorted(losses):
            keys.append(("loss", name))
            parts.append(losses[name].detach().float().view(1))
        optional = dict(zip(_OPTIONAL_METRICS, (grad_norm, num_zeros, params_norm, loss_scale)))
        for kind, value in optional.items():
            if value is not None:
                keys.append((kind, ""))
                parts.append(value.detach().float().view(1))
        if layer_grad_norms is not None:
            layer_names, norms = layer_grad_norms
            keys += [("layer", name) for name in layer_names]
            parts.append(norms.detach().float().view(-1))
        return cls(torch.cat(parts), keys) if parts else None

    def unpack(self, host: list[float]) -> _HostMetrics:
        """The values of `host` (this step's slice of the interval's one host copy), by name."""
        by_key = dict(zip(self.keys, host))
        layers = {f"grad-norm/{name}": v for (kind, name), v in by_key.items() if kind == "layer"}
        return _HostMetrics(
            losses={name: v for (kind, name), v in by_key.items() if kind == "loss"},
            grad_norm=by_key.get(("grad_norm", "")),
            num_zeros=by_key.get(("num_zeros", "")),
            params_norm=by_key.get(("params_norm", "")),
            loss_scale=by_key.get(("loss_scale", "")),
            layer_grad_norms=layers if any(kind == "layer" for kind, _ in self.keys) else None,
        )


@dataclass
class _Pending:
    """A finished step whose device values have not been read yet."""

    step: int
    consumed_samples: int
    learning_rate: float
    decoupled_learning_rate: float | None
    global_batch_size: int
    skipped: bool
    metrics: _DeviceMetrics | None = None
    """None for a step that consumed its batch without running (iterations_to_skip)."""


@dataclass
class TrainContext:
    """Everything the loop uses besides the state: built by `pretrain()`'s setup."""

    forward_step: ForwardStepFunc
    """The user's forward step, with `state` bound when it asks for it."""
    trained_model: nn.Module
    """What runs forward and backward: the plain model, compiled and/or DDP-wrapped when the run does that."""
    plain_model: nn.Module
    """The model as built, inside `trained_model`: what checkpoints save and load."""
    optimizer: MixedPrecisionOptimizer
    scheduler: OptimizerParamScheduler
    train_iterator: Iterator[Any] | None
    valid_iterator: Iterator[Any] | None
    test_iterator: Iterator[Any] | None
    microbatches: MicroBatchCalculator
    train_iters: int
    """Optimizer steps of the whole run (train.effective_train_iters)."""
    eval_global_batch_size: int
    """Samples of one evaluation batch over all ranks (train.effective_eval_global_batch_size)."""
    eval_num_microbatches: int
    flops_per_sample: float
    tokens_per_sample: int
    callbacks: CallbackManager
    profiler: Profiler | None = None
    checkpointer: Checkpointer | None = None
    progress_file: ProgressFile | None = None
    """logger.log_progress's progress.txt (rank 0 only)."""
    per_token_loss: bool = False
    rng_at_start: RNGSnapshot | None = None  # restored right before the first step
    step_groups: StepGroups | None = None
    """The process groups of the step's arithmetic under tensor / context / sharded parallelism."""
    pipeline: Pipeline | None = None
    """With pipeline parallelism: this rank's stages and their schedules (they run the steps)."""
    micro_batch_size: int = 1
    eval_micro_batch_size: int = 1
    rerun: RerunStateMachine | None = None
    """rerun_state_machine's result validation (None: the loss checks at each log interval only)."""
    fault_tolerance: FaultTolerance | None = None
    """ft's hang watchdog: the loop marks its steps and saves (None: ft off)."""
    stragglers: list[StragglerDetection] = field(default_factory=list)
    """The straggler detectors the config turns on (they run as callbacks; one may stop the run)."""


def _decoupled_lr(optimizer: MixedPrecisionOptimizer) -> float | None:
    for group in optimizer.param_groups:
        if "max_lr" in group:
            return float(group["lr"])
    return None


def _to_records(pending: list[_Pending]) -> tuple[list[StepRecord], dict[int, dict[str, float]]]:
    """Copy every pending step's values to the host at once (the interval's one synchronisation).

    Returns the step records and, per step, the per-layer gradient norms that were computed.
    """
    stacked = [pending_step.metrics.values for pending_step in pending if pending_step.metrics is not None]
    host = torch.cat(stacked).cpu().tolist() if stacked else []
    records: list[StepRecord] = []
    layers: dict[int, dict[str, float]] = {}
    offset = 0
    for pending_step in pending:
        got = _HostMetrics()
        if pending_step.metrics is not None:
            count = len(pending_step.metrics.keys)
            got = pending_step.metrics.unpack(host[offset : offset + count])
            offset += count
        if got.layer_grad_norms is not None:
            layers[pending_step.step] = got.layer_grad_norms
        records.append(
            StepRecord(
                step=pending_step.step,
                consumed_samples=pending_step.consumed_samples,
                learning_rate=pending_step.learning_rate,
                decoupled_learning_rate=pending_step.decoupled_learning_rate,
                global_batch_size=pending_step.global_batch_size,
                losses={} if pending_step.skipped else got.losses,
                grad_norm=got.grad_norm,
                num_zeros=got.num_zeros,
                params_norm=got.params_norm,
                loss_scale=got.loss_scale,
                skipped=pending_step.skipped,
                nan=any(not math.isfinite(v) for v in got.losses.values()),
            )
        )
    return records, layers


def _share_across_stages(
    pipeline: Pipeline, records: list[StepRecord], layer_norms: dict[int, dict[str, float]]
) -> dict[int, dict[str, float]]:
    """The losses only the last pipeline stage computes, on every stage (so all stop together), and
    the per-layer gradient norms of every stage's layers."""
    steps = [r.step for r in records]
    mine = [{"step": float(s), **layer_norms.get(s, {})} for s in steps]
    by_stage = pipeline.gather_from_stages([r.losses for r in records] + mine)
    for record, losses in zip(records, by_stage[-1][: len(records)]):
        record.losses = losses
        record.nan = any(not math.isfinite(v) for v in losses.values())
    merged: dict[int, dict[str, float]] = {}
    for stage in by_stage:
        for norms in stage[len(records) :]:
            step = int(norms.pop("step"))
            if norms:
                merged.setdefault(step, {}).update(norms)
    return merged


def train(state: GlobalState, context: TrainContext) -> None:
    """Run steps until train_iters (or an exit condition); evaluate and checkpoint on the way.

    On a CPU, freed host memory stays in the process meanwhile (`keep_freed_host_memory`): every
    step reuses the blocks of the last one instead of page-faulting fresh ones from the kernel.
    """
    with keep_freed_host_memory(enabled=state.device.type == "cpu"):
        _train_loop(state, context)


def _train_loop(state: GlobalState, context: TrainContext) -> None:
    cfg = state.cfg
    train_cfg, log_cfg, train_state = cfg.train, cfg.logger, state.train_state
    train_iters = context.train_iters
    model, optimizer, scheduler = context.trained_model, context.optimizer, context.scheduler
    train_iterator = context.train_iterator
    if train_iterator is None:  # pretrain() trains only when there is training data
        raise ValueError("train() needs training data: the context has no train_iterator")
    timers, logger = state.timers, state.logger
    callback_ctx = CallbackContext(state, model, optimizer, scheduler)

    model.train()
    if train_cfg.manual_gc:
        gc.disable()
        gc.collect()
    context.callbacks.fire("on_train_start", callback_ctx)
    if context.rng_at_start is not None:
        context.rng_at_start.restore()  # the last thing before the first step: nothing can draw in between

    pending: list[_Pending] = []
    recent_losses: list[float] = []
    recent_norms: list[float] = []
    interval_start, interval_steps, interval_samples = time.time(), 0, 0
    last_saved_step = train_state.step if train_state.step > 0 else None
    first_step = True
    exit_reason: str | None = None
    exit_code: int | None = None

    while train_state.step < train_iters:
        step = train_state.step + 1
        if context.profiler is not None:
            context.profiler.step_start(step)
        if context.microbatches.update(train_state.consumed_train_samples) and cfg.checkpoint.save:
            # Megatron saves when the batch size changes during ramp-up.
            _save(state, context, train_state.step)
            last_saved_step = train_state.step
        global_batch_size = context.microbatches.current_global_batch_size
        context.callbacks.fire("on_train_step_start", callback_ctx)
        if context.fault_tolerance is not None:
            context.fault_tolerance.step_start()

        if step in train_cfg.iterations_to_skip:
            # Consume the batch without an update (Megatron's iterations_to_skip).
            for _ in range(context.microbatches.num_microbatches):
                next(train_iterator)
            skipped = True
            result = None
            train_state.skipped_train_samples += global_batch_size
        else:
            try:
                result = train_step(
                    context.forward_step,
                    train_iterator,
                    model,
                    optimizer,
                    context.microbatches.num_microbatches,
                    per_token_loss=context.per_token_loss,
                    empty_cache_level=train_cfg.empty_unused_memory_level,
                    timers=timers,
                    groups=context.step_groups,
                    pipeline=context.pipeline,
                    micro_batch_size=context.micro_batch_size,
                    rerun=context.rerun,
                    step=step,
                )
            except RerunExit as stop:
                # The optimizer has not stepped: the state is that of the previous iteration, and the
                # machine has put the RNG back to this step's start, so a resumed run re-runs this step.
                exit_reason, exit_code = stop.reason, stop.code
                if stop.code == EXIT_CODE_RESUME_TO_DISAMBIGUATE and cfg.checkpoint.save:
                    _save(state, context, train_state.step)
                last_saved_step = train_state.step  # no other save: it would not hold the record
                break
            skipped = not result.updated
            if result.updated:
                scheduler.step(increment=global_batch_size)
            if cfg.ddp.check_for_large_grads and result.grad_norm is not None:
                check_large_grads(step, float(result.grad_norm), recent_norms)  # opt-in host sync

        train_state.step = step
        train_state.consumed_train_samples += global_batch_size
        train_state.floating_point_operations_so_far += context.flops_per_sample * global_batch_size
        interval_steps += 1
        interval_samples += global_batch_size

        pending_step = _Pending(
            step,
            train_state.consumed_train_samples,
            float(optimizer.param_groups[0]["lr"]),
            _decoupled_lr(optimizer),
            global_batch_size,
            skipped,
        )
        if result is not None:
            measure_layers = (
                log_cfg.log_l2_norm_grad_to_tensorboard and step % log_cfg.tensorboard_log_interval == 0
            )
            pending_step.metrics = _DeviceMetrics.stack(
                result.losses,
                grad_norm=result.grad_norm,
                num_zeros=result.num_zeros,
                params_norm=optimizer.params_norm() if log_cfg.log_params_norm else None,
                loss_scale=optimizer.scaler.scale if optimizer.scaler else None,
                layer_grad_norms=optimizer.layer_grad_norms() if measure_layers else None,
            )
        pending.append(pending_step)
        context.callbacks.fire(
            "on_train_step_end",
            CallbackContext(state, model, optimizer, scheduler, {"losses": result.losses if result else {}}),
        )
        if context.fault_tolerance is not None:
            context.fault_tolerance.step_end()
        if first_step:
            if state.dist is not None:
                set_timeout_after_init(state.dist, cfg.dist)
            if (
                context.checkpointer is not None
            ):  # the optimizer state exists now: size the async staging memory
                context.checkpointer.prepare_staging(model=context.plain_model, optimizer=optimizer)
            first_step = False

        if (
            train_cfg.train_sync_interval
            and step % train_cfg.train_sync_interval == 0
            and torch.cuda.is_available()
        ):
            torch.cuda.synchronize()
        if logger is not None:
            logger.progress(step)
        if step % log_cfg.log_interval == 0 or step == train_iters:
            records, layer_norms = _to_records(pending)  # the one host synchronisation of the interval
            if context.pipeline is not None:
                layer_norms = _share_across_stages(context.pipeline, records, layer_norms)
            elapsed = time.time() - interval_start
            names = ["forward-backward", "optimizer"]
            timing = IntervalTiming(
                iterations=interval_steps,
                elapsed_s=elapsed,
                tokens=interval_samples * context.tokens_per_sample,
                flops=context.flops_per_sample * interval_samples,
                timers=timers.summarize(names, normalizer=interval_steps) if timers is not None else {},
            )
            if logger is not None:
                logger.log_train(records, timing)
                for at, values in layer_norms.items():
                    logger.log_scalars(at, values)
            check_losses(state, records, recent_losses)
            report = context.rerun.determinism_report() if context.rerun is not None else None
            if report is not None and logger is not None:
                logger.info(report)
            pending.clear()
            interval_start, interval_steps, interval_samples = time.time(), 0, 0

        if train_cfg.manual_gc and train_cfg.manual_gc_interval and step % train_cfg.manual_gc_interval == 0:
            gc.collect()
        interval = train_cfg.check_weight_hash_across_dp_replicas_interval
        replicas = replica_group(state) if interval and step % interval == 0 else False
        if replicas is not False:
            if not weights_match_across_ranks(context.plain_model, replicas):
                raise WeightHashMismatchError(
                    f"data-parallel replicas hold different weights at iteration {step}; "
                    "this points at a non-deterministic kernel or a hardware fault"
                )

        if (
            train_cfg.eval_interval
            and step % train_cfg.eval_interval == 0
            and train_state.do_valid
            and context.valid_iterator is not None
            and train_cfg.eval_iters > 0
        ):
            pause = time.time()
            run_evaluation(state, context, "validation")
            interval_start += time.time() - pause  # evaluation time is not training time

        if context.profiler is not None:
            context.profiler.step_end(step)

        # Checkpoint and exit decisions (Megatron's checkpoint_and_decide_exit).
        signal, over_time = decide_exit(state)
        saved = False
        if signal:
            exit_reason = f"received {train_cfg.exit_signal.name}"
        elif (
            cfg.checkpoint.save and cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
        ):
            _save(state, context, step)
            saved = True
        if exit_reason is None and over_time:
            exit_reason = f"exit_duration_in_mins ({train_cfg.exit_duration_in_mins}) reached"
        if exit_reason is None and train_cfg.exit_interval and step % train_cfg.exit_interval == 0:
            exit_reason = f"exit_interval ({train_cfg.exit_interval}) reached"
        if exit_reason is None:  # nvrx_straggler.stop_if_detected: every rank decided the same
            exit_reason = next((d.stop_reason for d in context.stragglers if d.stop_reason), None)
        if saved:
            last_saved_step = step
        if exit_reason is not None:
            break

    if pending:
        records, layer_norms = _to_records(pending)
        if context.pipeline is not None:
            _share_across_stages(context.pipeline, records, layer_norms)
        check_losses(state, records, recent_losses)
    if cfg.checkpoint.save and train_state.step > 0 and last_saved_step != train_state.step:
        _save(state, context, train_state.step)
    if exit_reason is not None and logger is not None:
        logger.info(f"exiting at iteration {train_state.step}: {exit_reason}")
    state.exit_reason = exit_reason
    state.exit_code = exit_code
    if train_cfg.manual_gc:
        gc.enable()
    context.callbacks.fire("on_train_end", callback_ctx)


def _save(state: GlobalState, context: TrainContext, step: int) -> None:
    if context.checkpointer is None:
        return
    train_state = state.train_state
    ft = context.fault_tolerance
    with ft.checkpointing() if ft is not None else contextlib.nullcontext():
        path = context.checkpointer.save(
            step,
            model=context.plain_model,
            optimizer=context.optimizer,
            scheduler=context.scheduler,
            train_state=train_state,
            rerun_state=context.rerun.checkpoint_state() if context.rerun is not None else None,
        )
    if context.progress_file is not None:
        context.progress_file.checkpoint_saved(
            step,
            train_state.consumed_train_samples,
            train_state.consumed_train_samples * context.tokens_per_sample,
            train_state.floating_point_operations_so_far,
            time.time() - state.start_time,
            state.dist.world_size if state.dist is not None else 1,
            async_save=state.cfg.checkpoint.async_save,
        )
    context.callbacks.fire(
        "on_checkpoint_save",
        CallbackContext(
            state, context.trained_model, context.optimizer, context.scheduler, {"path": path, "step": step}
        ),
    )


Split = Literal["validation", "test"]


def run_evaluation(state: GlobalState, context: TrainContext, split: Split) -> dict[str, float]:
    """Evaluate `train.eval_iters` batches of `split`, log the result and return it."""
    train_cfg = state.cfg.train
    iterator = context.valid_iterator if split == "validation" else context.test_iterator
    if iterator is None or train_cfg.eval_iters <= 0:
        return {}
    event = "eval" if split == "validation" else "test"
    model, optimizer, scheduler = context.trained_model, context.optimizer, context.scheduler
    context.callbacks.fire(f"on_{event}_start", CallbackContext(state, model, optimizer, scheduler))
    if train_cfg.manual_gc and train_cfg.manual_gc_eval:
        gc.collect()
    losses = evaluate(
        context.forward_step,
        iterator,
        model,
        optimizer,
        train_cfg.eval_iters,
        context.eval_num_microbatches,
        pipeline=context.pipeline,
        micro_batch_size=context.eval_micro_batch_size,
    )
    if split == "validation":
        state.train_state.consumed_valid_samples += train_cfg.eval_iters * context.eval_global_batch_size
    if train_cfg.manual_gc and train_cfg.manual_gc_eval:
        gc.collect()
    if state.logger is not None:
        state.logger.log_evaluation(
            state.train_state.step, state.train_state.consumed_train_samples, losses, split=split
        )
    context.callbacks.fire(
        f"on_{event}_end", CallbackContext(state, model, optimizer, scheduler, {"losses": losses})
    )
    return losses
