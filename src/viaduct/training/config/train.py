"""`train`: loop length, batch sizes, evaluation cadence, exit conditions, garbage collection.

Follows Megatron Bridge v0.2.0, where the evaluation fields live in `TrainingConfig`, plus HEAD's
separate evaluation batch sizes (None falls back to the training ones).
"""

import signal
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problems, derived
from viaduct.training.config._checks import positive

# The kernel delivers these without running any handler (signal(7)); installing one fails at setup.
_UNCATCHABLE_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)


@dataclass(kw_only=True)
class TrainingConfig(ConfigBase):
    """Training loop: length, batch sizes, evaluation cadence, exit conditions, garbage collection."""

    _component_: ClassVar[str] = "train"

    micro_batch_size: int | None = None
    """Samples per forward/backward pass on one data-parallel rank (required)."""

    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks: micro_batch_size × data-parallel size × accumulation."""

    rampup_batch_size: list[int] | None = None
    """Batch-size ramp-up as [start batch size, increment, ramp-up samples]."""

    decrease_batch_size_if_needed: bool = False
    """Round global_batch_size down to a multiple of micro_batch_size × data-parallel size if needed."""

    train_iters: int | None = None
    """Total optimizer steps over all runs (set this or train_samples)."""

    train_samples: int | None = None
    """Total training samples over all runs (set this or train_iters); steps = samples // global batch."""

    exit_interval: int | None = None
    """Save and exit when the step number is divisible by this value."""

    exit_duration_in_mins: int | None = None
    """Save and exit after this many minutes of wall-clock time (maximum over ranks)."""

    exit_signal_handler: bool = True
    """Finish the step, save a checkpoint (when checkpoint.save is set) and exit 0 on exit_signal."""

    exit_signal: signal.Signals = signal.SIGTERM
    """Signal that makes training save a checkpoint and exit."""

    exit_signal_handler_for_dataloader: bool = False
    """Install the exit-signal handler in data-loader worker processes too."""

    manual_gc: bool = False
    """Disable automatic garbage collection; collect at fixed steps instead (aligned across ranks)."""

    manual_gc_interval: int = 0
    """With manual_gc, collect garbage every this many steps (0: only around evaluation)."""

    manual_gc_eval: bool = True
    """With manual_gc, collect garbage at the start and end of each evaluation."""

    empty_unused_memory_level: Literal[0, 1, 2] = 0
    """Release cached accelerator memory each step: 0 never, 1 moderately, 2 aggressively."""

    check_weight_hash_across_dp_replicas_interval: int | None = None
    """Every this many steps check that all data-parallel replicas hold identical weights."""

    train_sync_interval: int | None = None
    """Synchronize host and device every this many steps so the host does not run far ahead."""

    iterations_to_skip: list[int] = field(default_factory=list)
    """1-based steps whose batch is consumed without an optimizer update."""

    eval_iters: int = 100
    """Batches per evaluation of the validation (and test) set; 0 disables evaluation."""

    eval_interval: int | None = 1000
    """Evaluate on the validation set every this many steps; None evaluates only after training."""

    eval_global_batch_size: int | None = None
    """Global batch size for evaluation; None uses global_batch_size."""

    eval_micro_batch_size: int | None = None
    """Micro batch size for evaluation; None uses micro_batch_size."""

    skip_train: bool = False
    """Skip the training loop: only evaluate on the validation and test sets, then exit."""

    torch_compile: bool | None = None
    """Compile the model with torch.compile; None compiles on CUDA and runs eagerly on the CPU."""

    torch_compile_scope: Literal["model", "layers"] | None = None
    """Compile the whole model or each layer; None: the model on one rank, layers under data parallelism."""

    effective_train_iters: int | None = derived()
    """Optimizer steps of the whole run: train_iters, or train_samples // global_batch_size."""

    effective_eval_global_batch_size: int | None = derived()
    """eval_global_batch_size, or global_batch_size when that is unset."""

    effective_eval_micro_batch_size: int | None = derived()
    """eval_micro_batch_size, or micro_batch_size when that is unset."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "num_epochs": "epoch-based training applies to finite SFT datasets, which viaduct does not build yet",
        "step_batch_size_schedule": "step-wise batch-size schedules are not built; use global_batch_size",
        "exit_signal_handler_for_training": "exit_signal_handler already gives a clean shutdown",
        "gpu_sniff_test_interval": "GPU sniff tests are Megatron-LM cluster tooling, not part of viaduct",
        "check_optimizer_step_success": "a skipped optimizer step is always agreed on by all ranks",
        "skip_sync_grad_norm_across_mp": "the gradient norm is always reduced over model-parallel ranks",
    }

    def finalize(self) -> None:
        """Check batch sizes and run length; derive the step count and the evaluation batch sizes."""
        p = Problems()
        mbs, gbs = self.micro_batch_size, self.global_batch_size
        if mbs is None:
            p.add("micro_batch_size", "must be set", None, fix="set train.micro_batch_size, e.g. 1")
        if gbs is None:
            p.add("global_batch_size", "must be set", None, fix="set train.global_batch_size, e.g. 8")
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "train_samples"):
            positive(p, self, name)
        # Divisibility by micro batch × data-parallel size (train and eval) needs the world size:
        # ConfigContainer.validate() checks it.

        if self.train_iters is None and self.train_samples is None:
            p.add(
                "train_iters",
                "the run length is not set",
                None,
                fix="set train.train_iters (optimizer steps) or train.train_samples",
            )
        elif self.train_iters is not None and self.train_samples is not None:
            p.add(
                "train_samples",
                "train_iters and train_samples are both set; the run length must have one owner",
                self.train_samples,
                fix="remove train.train_samples or train.train_iters",
            )

        for name in (
            "exit_interval",
            "exit_duration_in_mins",
            "check_weight_hash_across_dp_replicas_interval",
            "train_sync_interval",
            "eval_interval",
            "eval_global_batch_size",
            "eval_micro_batch_size",
        ):
            positive(p, self, name)
        positive(p, self, "manual_gc_interval", zero_ok=True)
        positive(p, self, "eval_iters", zero_ok=True)
        if self.rampup_batch_size is not None:
            r = self.rampup_batch_size
            fix = "set train.rampup_batch_size to [start, increment, samples], e.g. [16, 16, 100000]"
            if len(r) != 3 or any(v <= 0 for v in r):
                p.add("rampup_batch_size", "needs three positive numbers", r, fix=fix)
            elif gbs is not None and (r[0] > gbs or (gbs - r[0]) % r[1]):
                p.add(
                    "rampup_batch_size",
                    f"must ramp from its start to global_batch_size ({gbs}) in whole increments",
                    r,
                    fix=fix + " with (global_batch_size - start) divisible by the increment",
                )
        handled = self.exit_signal_handler or self.exit_signal_handler_for_dataloader
        if handled and self.exit_signal in _UNCATCHABLE_SIGNALS:
            p.add(
                "exit_signal",
                f"{self.exit_signal.name} cannot be caught: no handler can save a checkpoint and exit on it",
                self.exit_signal.name,
                fix="set train.exit_signal to a signal that can be caught, e.g. SIGTERM, SIGINT or SIGUSR1",
            )
        bad_skips = [i for i in self.iterations_to_skip if i < 1]
        if bad_skips:
            p.add(
                "iterations_to_skip",
                "steps are numbered from 1",
                bad_skips,
                fix="list only steps >= 1 in train.iterations_to_skip",
            )

        eval_gbs = self.eval_global_batch_size if self.eval_global_batch_size is not None else gbs
        eval_mbs = self.eval_micro_batch_size if self.eval_micro_batch_size is not None else mbs

        steps = self.train_iters
        if self.train_iters is None and self.train_samples is not None and gbs:
            steps = self.train_samples // gbs
            if steps == 0 and self.train_samples > 0:
                p.add(
                    "train_samples",
                    f"is smaller than one global batch ({gbs} samples), so the run has 0 steps",
                    self.train_samples,
                    fix=f"set train.train_samples to at least {gbs}",
                )
        p.raise_if_any()

        self.derive("effective_train_iters", steps, "train_iters or train_samples // global_batch_size")
        self.derive(
            "effective_eval_global_batch_size", eval_gbs, "eval_global_batch_size or global_batch_size"
        )
        self.derive("effective_eval_micro_batch_size", eval_mbs, "eval_micro_batch_size or micro_batch_size")


@dataclass(kw_only=True)
class ValidationConfig(ConfigBase):
    """Megatron Bridge's `validation:` section, read from its YAML files; viaduct keeps these in `train`.

    Loading a file (or a partial file, or a `validation.X=...` override) moves every key given here
    to `train.X`; `to_yaml()` writes them under `train`, where Bridge also reads them (as the older
    location of the same settings). The object never becomes part of a `ConfigContainer`.
    """

    eval_iters: int = 100
    """Moves to train.eval_iters: batches per evaluation; 0 disables evaluation."""

    eval_interval: int | None = 1000
    """Moves to train.eval_interval: evaluate every this many steps; None only after training."""

    eval_global_batch_size: int | None = None
    """Moves to train.eval_global_batch_size: global batch size for evaluation."""

    eval_micro_batch_size: int | None = None
    """Moves to train.eval_micro_batch_size: micro batch size for evaluation."""

    skip_train: bool = False
    """Moves to train.skip_train: only evaluate, then exit."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "start_eval_at_iter": "evaluation runs from the first eval_interval on",
        "test_mode": "Megatron internal test switch",
        "full_validation": "full-dataset validation is not built",
        "multiple_validation_sets": "multiple validation sets are not built",
        "validation_set_names": "multiple validation sets are not built",
    }
