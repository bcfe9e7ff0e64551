"""The training loop (spec §5.3): steps, logging, evaluation, checkpoints and exits.

The host never waits for the device inside a step: each step leaves its losses, grad norm and
loss scale on the device; they are copied to the host together every `logger.log_interval` steps
(one synchronisation per interval), and TensorBoard still gets a value for every step.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from viaduct.distributed.init import set_timeout_after_init
from viaduct.training.callbacks import CallbackContext, CallbackManager
from viaduct.training.eval import evaluate
from viaduct.training.logging import IntervalTiming, StepRecord
from viaduct.training.microbatches import MicroBatchCalculator
from viaduct.training.optim import MixedPrecisionOptimizer
from viaduct.training.state import GlobalState
from viaduct.training.step import StepResult, train_step

log = logging.getLogger("viaduct")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (rerun_state_machine.check_for_nan_in_loss)."""


class WeightHashMismatchError(RuntimeError):
    """Data-parallel replicas hold different weights (train.check_weight_hash_across_dp_replicas_interval)."""


@dataclass
class _Pending:
    """A finished step whose device values have not been read yet."""

    step: int
    consumed_samples: int
    learning_rate: float
    decoupled_learning_rate: float | None
    global_batch_size: int
    skipped: bool
    names: list[str] = field(default_factory=list)
    values: torch.Tensor | None = None  # [losses..., grad_norm, num_zeros, params_norm, loss_scale]
    has: tuple[bool, bool, bool, bool] = (False, False, False, False)
    layer_names: list[str] = field(default_factory=list)
    layer_norms: torch.Tensor | None = None  # per-layer gradient norms (log_l2_norm_grad_to_tensorboard)


@dataclass
class TrainContext:
    """Everything the loop uses besides the state: built by `pretrain()`'s setup."""

    forward_step: Callable[[Iterator[Any], nn.Module], Any]
    model: nn.Module  # as trained (possibly DDP-wrapped and compiled)
    module: nn.Module  # the plain model inside
    optimizer: MixedPrecisionOptimizer
    scheduler: Any
    train_iterator: Iterator[Any] | None
    valid_iterator: Iterator[Any] | None
    microbatches: MicroBatchCalculator
    eval_num_microbatches: int
    flops_per_sample: float
    tokens_per_sample: int
    callbacks: CallbackManager
    profiler: Any = None
    checkpointer: Any = None
    per_token_loss: bool = False


def _decoupled_lr(optimizer: MixedPrecisionOptimizer) -> float | None:
    for g in optimizer.param_groups:
        if "max_lr" in g:
            return float(g["lr"])
    return None


def _pack(
    result: StepResult, optimizer: MixedPrecisionOptimizer, params_norm: torch.Tensor | None
) -> tuple[list[str], torch.Tensor | None, tuple[bool, bool, bool, bool]]:
    names = sorted(result.losses)
    parts = [result.losses[n].float().view(1) for n in names]
    extras = (
        result.grad_norm,
        result.num_zeros,
        params_norm,
        optimizer.scaler.scale if optimizer.scaler else None,
    )
    parts += [e.detach().float().view(1) for e in extras if e is not None]
    has = tuple(e is not None for e in extras)
    return names, (torch.cat(parts) if parts else None), has  # type: ignore[return-value]


def _to_records(pending: list[_Pending]) -> tuple[list[StepRecord], dict[int, dict[str, float]]]:
    """Copy every pending step's values to the host at once (the interval's one synchronisation).

    Returns the step records and, per step, the per-layer gradient norms that were computed.
    """
    tensors = [t for p in pending for t in (p.values, p.layer_norms) if t is not None]
    host = torch.cat(tensors).cpu().tolist() if tensors else []
    records, layers, i = [], {}, 0
    for p in pending:
        vals: list[float] = []
        if p.values is not None:
            vals = host[i : i + p.values.numel()]
            i += p.values.numel()
        if p.layer_norms is not None:
            n = p.layer_norms.numel()
            layers[p.step] = {f"grad-norm/{k}": v for k, v in zip(p.layer_names, host[i : i + n])}
            i += n
        losses = dict(zip(p.names, vals[: len(p.names)]))
        rest = iter(vals[len(p.names) :])
        grad_norm, num_zeros, params_norm, loss_scale = (next(rest) if h else None for h in p.has)
        records.append(
            StepRecord(
                step=p.step,
                consumed_samples=p.consumed_samples,
                learning_rate=p.learning_rate,
                decoupled_learning_rate=p.decoupled_learning_rate,
                global_batch_size=p.global_batch_size,
                losses={} if p.skipped else losses,
                grad_norm=grad_norm,
                num_zeros=num_zeros,
                params_norm=params_norm,
                loss_scale=loss_scale,
                skipped=p.skipped,
                nan=any(not math.isfinite(v) for v in losses.values()),
            )
        )
    return records, layers


def _check_losses(state: GlobalState, records: list[StepRecord], recent: list[float]) -> None:
    rsm = state.cfg.rerun_state_machine  # type: ignore[union-attr]
    for r in records:
        if r.nan and rsm.check_for_nan_in_loss:
            raise NonFiniteLossError(
                f"the training loss is {r.losses} at iteration {r.step} (NaN or infinite); stopping "
                "(rerun_state_machine.check_for_nan_in_loss). Lower optimizer.lr, raise optimizer.clip_grad "
                "or check the data; set rerun_state_machine.check_for_nan_in_loss=false to continue anyway"
            )
        for name, value in r.losses.items():
            if rsm.check_for_spiky_loss and recent and value > rsm.spiky_loss_factor * max(recent):
                log.warning(
                    "spiky loss at iteration %d: %s = %.4f is over %.1f × the largest of the last %d (%.4f)",
                    r.step,
                    name,
                    value,
                    rsm.spiky_loss_factor,
                    len(recent),
                    max(recent),
                )
            if math.isfinite(value):
                recent.append(value)
                del recent[:-100]


def _check_large_grads(step: int, norm: float, recent: list[float]) -> None:
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


def _weights_match_across_ranks(module: nn.Module, group: Any = None) -> bool:
    """All data-parallel replicas hold bitwise-identical weights (one checksum per parameter)."""
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, sums, group=group)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _decide_exit(state: GlobalState) -> tuple[bool, bool]:
    """(signal received on any rank, exit_duration_in_mins exceeded on any rank): host-side only."""
    t = state.cfg.train  # type: ignore[union-attr]
    handler = state.signal_handler
    signal = bool(handler is not None and handler.received())
    minutes = (time.time() - state.start_time) / 60.0
    over = t.exit_duration_in_mins is not None and minutes > t.exit_duration_in_mins
    ctx = state.dist
    if ctx is not None and ctx.distributed and (handler is not None or t.exit_duration_in_mins is not None):
        flags = torch.tensor([float(signal), float(over)], device=ctx.host_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.host_group)
        signal, over = bool(flags[0]), bool(flags[1])  # a device sync without the gloo group
    return signal, over


def train(state: GlobalState, tc: TrainContext) -> None:
    """Run steps until train_iters (or an exit condition); evaluate and checkpoint on the way."""
    cfg = state.cfg
    assert cfg is not None  # set by pretrain()
    t, lc, ts = cfg.train, cfg.logger, state.train_state
    train_iters = t.effective_train_iters
    model, optimizer, scheduler = tc.model, tc.optimizer, tc.scheduler
    timers, logger = state.timers, state.logger
    cb_ctx = CallbackContext(state, model, optimizer, scheduler)

    model.train()
    if t.manual_gc:
        gc.disable()
        gc.collect()
    tc.callbacks.fire("on_train_start", cb_ctx)

    pending: list[_Pending] = []
    recent_losses: list[float] = []
    recent_norms: list[float] = []
    interval_start, interval_steps, interval_samples = time.time(), 0, 0
    last_saved_step = ts.step if ts.step > 0 else None
    first_step = True
    exit_reason: str | None = None

    while ts.step < train_iters:
        step = ts.step + 1
        if tc.profiler is not None:
            tc.profiler.step_start(step)
        if tc.microbatches.update(ts.consumed_train_samples) and cfg.checkpoint.save:
            # Megatron saves when the batch size changes during ramp-up.
            _save(state, tc, ts.step)
            last_saved_step = ts.step
        gbs = tc.microbatches.current_global_batch_size
        tc.callbacks.fire("on_train_step_start", cb_ctx)

        if step in t.iterations_to_skip:
            # Consume the batch without an update (Megatron's iterations_to_skip).
            for _ in range(tc.microbatches.num_microbatches):
                next(tc.train_iterator)  # type: ignore[arg-type]
            skipped = True
            result = None
            ts.skipped_train_samples += gbs
        else:
            result = train_step(
                tc.forward_step,
                tc.train_iterator,  # type: ignore[arg-type]
                model,
                optimizer,
                tc.microbatches.num_microbatches,
                per_token_loss=tc.per_token_loss,
                empty_cache_level=t.empty_unused_memory_level,
                timers=timers,
            )
            skipped = not result.updated
            if result.updated:
                scheduler.step(increment=gbs)
            if cfg.ddp.check_for_large_grads and result.grad_norm is not None:
                _check_large_grads(step, float(result.grad_norm), recent_norms)  # opt-in host sync

        ts.step = step
        ts.consumed_train_samples += gbs
        ts.floating_point_operations_so_far += tc.flops_per_sample * gbs
        interval_steps += 1
        interval_samples += gbs

        params_norm = optimizer.params_norm() if lc.log_params_norm else None
        p = _Pending(
            step,
            ts.consumed_train_samples,
            float(optimizer.param_groups[0]["lr"]),
            _decoupled_lr(optimizer),
            gbs,
            skipped,
        )
        if result is not None:
            p.names, p.values, p.has = _pack(result, optimizer, params_norm)
            if lc.log_l2_norm_grad_to_tensorboard and step % lc.tensorboard_log_interval == 0:
                p.layer_names, p.layer_norms = optimizer.layer_grad_norms()
        pending.append(p)
        tc.callbacks.fire(
            "on_train_step_end",
            CallbackContext(state, model, optimizer, scheduler, {"losses": result.losses if result else {}}),
        )
        if first_step:
            set_timeout_after_init(state.dist, cfg.dist)  # type: ignore[arg-type]
            if tc.checkpointer is not None:  # the optimizer state exists now: size the async staging memory
                tc.checkpointer.prepare_staging(model=tc.module, optimizer=optimizer)
            first_step = False

        if t.train_sync_interval and step % t.train_sync_interval == 0 and torch.cuda.is_available():
            torch.cuda.synchronize()
        if logger is not None:
            logger.progress(step)
        if step % lc.log_interval == 0 or step == train_iters:
            records, layer_norms = _to_records(pending)  # the one host synchronisation of the interval
            elapsed = time.time() - interval_start
            names = ["forward-backward", "optimizer"]
            timing = IntervalTiming(
                iterations=interval_steps,
                elapsed_s=elapsed,
                tokens=interval_samples * tc.tokens_per_sample,
                flops=tc.flops_per_sample * interval_samples,
                timers=timers.summarize(names, normalizer=interval_steps) if timers is not None else {},
            )
            if logger is not None:
                logger.log_train(records, timing)
                for at, values in layer_norms.items():
                    logger.log_scalars(at, values)
            _check_losses(state, records, recent_losses)
            pending.clear()
            interval_start, interval_steps, interval_samples = time.time(), 0, 0

        if t.manual_gc and t.manual_gc_interval and step % t.manual_gc_interval == 0:
            gc.collect()
        interval = t.check_weight_hash_across_dp_replicas_interval
        if interval and step % interval == 0 and dist.is_available() and dist.is_initialized():
            if not _weights_match_across_ranks(tc.module):
                raise WeightHashMismatchError(
                    f"data-parallel replicas hold different weights at iteration {step}; "
                    "this points at a non-deterministic kernel or a hardware fault"
                )

        if (
            t.eval_interval
            and step % t.eval_interval == 0
            and ts.do_valid
            and tc.valid_iterator is not None
            and t.eval_iters > 0
        ):
            pause = time.time()
            run_evaluation(state, tc, "validation")
            interval_start += time.time() - pause  # evaluation time is not training time

        if tc.profiler is not None:
            tc.profiler.step_end(step)

        # Checkpoint and exit decisions (Megatron's checkpoint_and_decide_exit).
        signal, over_time = _decide_exit(state)
        saved = False
        if signal:
            exit_reason = f"received {t.exit_signal.name}"
        elif (
            cfg.checkpoint.save and cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
        ):
            _save(state, tc, step)
            saved = True
        if exit_reason is None and over_time:
            exit_reason = f"exit_duration_in_mins ({t.exit_duration_in_mins}) reached"
        if exit_reason is None and t.exit_interval and step % t.exit_interval == 0:
            exit_reason = f"exit_interval ({t.exit_interval}) reached"
        if saved:
            last_saved_step = step
        if exit_reason is not None:
            break

    if pending:
        _check_losses(state, _to_records(pending)[0], recent_losses)
    if cfg.checkpoint.save and ts.step > 0 and last_saved_step != ts.step:
        _save(state, tc, ts.step)
    if exit_reason is not None and logger is not None:
        logger.info(f"exiting at iteration {ts.step}: {exit_reason}")
    state.user_state["exit_reason"] = exit_reason
    if t.manual_gc:
        gc.enable()
    tc.callbacks.fire("on_train_end", cb_ctx)


def _save(state: GlobalState, tc: TrainContext, step: int) -> None:
    if tc.checkpointer is None:
        return
    ts = state.train_state
    path = tc.checkpointer.save(
        step, model=tc.module, optimizer=tc.optimizer, scheduler=tc.scheduler, train_state=ts
    )
    progress = state.user_state.get("progress_file")
    if progress is not None:
        progress.checkpoint_saved(
            step,
            ts.consumed_train_samples,
            ts.consumed_train_samples * tc.tokens_per_sample,
            ts.floating_point_operations_so_far,
            time.time() - state.start_time,
            state.dist.world_size if state.dist is not None else 1,
            async_save=state.cfg.checkpoint.async_save,  # type: ignore[union-attr]
        )
    tc.callbacks.fire(
        "on_checkpoint_save",
        CallbackContext(state, tc.model, tc.optimizer, tc.scheduler, {"path": path, "step": step}),
    )


def run_evaluation(state: GlobalState, tc: TrainContext, split: str) -> dict[str, float]:
    """Evaluate `train.eval_iters` batches of `split`, log the result and return it."""
    cfg = state.cfg
    t = cfg.train  # type: ignore[union-attr]
    iterator = tc.valid_iterator if split == "validation" else state.user_state.get("test_iterator")
    if iterator is None or t.eval_iters <= 0:
        return {}
    event = "eval" if split == "validation" else "test"
    tc.callbacks.fire(f"on_{event}_start", CallbackContext(state, tc.model, tc.optimizer, tc.scheduler))
    if t.manual_gc and t.manual_gc_eval:
        gc.collect()
    losses = evaluate(
        tc.forward_step, iterator, tc.model, tc.optimizer, t.eval_iters, tc.eval_num_microbatches
    )
    samples = t.eval_iters * t.effective_eval_global_batch_size
    if split == "validation":
        state.train_state.consumed_valid_samples += samples
    if t.manual_gc and t.manual_gc_eval:
        gc.collect()
    if state.logger is not None:
        state.logger.log_evaluation(
            state.train_state.step,
            state.train_state.consumed_train_samples,
            losses,
            split=split,  # type: ignore[arg-type]
        )
    tc.callbacks.fire(
        f"on_{event}_end", CallbackContext(state, tc.model, tc.optimizer, tc.scheduler, {"losses": losses})
    )
    return losses
