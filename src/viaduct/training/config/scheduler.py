"""`scheduler`: learning-rate and weight-decay schedules.

The user gives lengths in iterations (`lr_decay_iters`, ...) or in samples (`lr_decay_samples`, ...),
matching how the run length is given (`train.train_iters` or `train.train_samples`). The scheduler
itself counts **samples**: `compute_scheduler_steps()` turns the user's lengths into the derived
`*_steps` fields, and the runtime scheduler advances by the global batch size per optimizer step.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

from viaduct.config import ConfigBase, Problems, derived, unsupported
from viaduct.training.config._checks import in_range, positive

_ITER_FIELDS = ("lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters")
_SAMPLE_FIELDS = ("lr_decay_samples", "lr_warmup_samples", "lr_wsd_decay_samples")


@dataclass(kw_only=True)
class SchedulerConfig(ConfigBase):
    """Learning-rate warmup and decay, and the weight-decay schedule."""

    _component_: ClassVar[str] = "scheduler"

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "linear"
    """Shape of the learning-rate decay after warmup (WSD: warmup, stable, decay)."""

    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "exponential"
    """Shape of the final annealing phase of the WSD schedule."""

    lr_decay_iters: int | None = None
    """Steps to decay the learning rate over; None uses scheduler.max_steps or train.train_iters."""

    lr_decay_samples: int | None = None
    """Samples to decay the learning rate over (sample-based runs); None uses train.train_samples."""

    lr_wsd_decay_iters: int | None = None
    """Steps of the WSD annealing phase; None anneals over the whole decay."""

    lr_wsd_decay_samples: int | None = None
    """Samples of the WSD annealing phase (sample-based runs); None anneals over the whole decay."""

    lr_warmup_fraction: float | None = None
    """Warmup length as a fraction of the decay length (instead of lr_warmup_iters/lr_warmup_samples)."""

    lr_warmup_iters: int = 0
    """Steps of linear learning-rate warmup."""

    lr_warmup_samples: int = 0
    """Samples of linear learning-rate warmup (sample-based runs)."""

    lr_warmup_init: float = 0.0
    """Learning rate at the start of warmup."""

    override_opt_param_scheduler: bool = False
    """On resume, keep this config's schedule without listing how it differs from the checkpoint's."""

    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, take the schedule from the checkpoint (by default this config's wins, changes logged)."""

    start_weight_decay: float | None = None
    """Weight decay at the start of the run; None (with end_weight_decay None) uses optimizer.weight_decay."""

    end_weight_decay: float | None = None
    """Weight decay at the end of the run; None (with start_weight_decay None) uses optimizer.weight_decay."""

    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = "constant"
    """How weight decay moves from start_weight_decay to end_weight_decay."""

    no_weight_decay_cond_type: Literal["qwen3_next"] | None = unsupported(
        "the Qwen3-Next weight-decay rule", default=None
    )
    """Variant of the rule choosing parameters without weight decay."""

    max_steps: int | None = None
    """Schedule as if the run were this many steps long (for truncated runs); iteration-based runs only."""

    lr_decay_steps: int | None = derived()
    """Samples to decay the learning rate over (computed by validation)."""

    lr_warmup_steps: int | None = derived()
    """Samples to warm the learning rate up over (computed by validation)."""

    wd_incr_steps: int | None = derived()
    """Samples to move the weight decay from start to end over (computed by validation)."""

    wsd_decay_steps: int | None = derived()
    """Samples of the WSD annealing phase (computed by validation; None unless lr_decay_style is WSD)."""

    def finalize(self) -> None:
        """Check this component alone; step counts need `train` and come from `compute_scheduler_steps`."""
        p = Problems()
        positive(p, self, "max_steps")
        for name in ("lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples"):
            positive(p, self, name)
        for name in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init"):
            positive(p, self, name, zero_ok=True)
        in_range(p, self, "lr_warmup_fraction", 0.0, 1.0, hi_open=True)

        start, end = self.start_weight_decay, self.end_weight_decay
        positive(p, self, "start_weight_decay", zero_ok=True)
        if (start is None) != (end is None):
            name = "end_weight_decay" if end is None else "start_weight_decay"
            p.add(
                name,
                "start_weight_decay and end_weight_decay are set together or not at all",
                None,
                fix=f"set scheduler.{name} too (or unset both to use optimizer.weight_decay)",
            )
        elif start is not None and end is not None:
            if end < start:
                p.add(
                    "end_weight_decay",
                    f"({end}) must be >= start_weight_decay ({start})",
                    end,
                    fix="set scheduler.end_weight_decay >= scheduler.start_weight_decay",
                )
            elif self.weight_decay_incr_style == "constant" and end != start:
                p.add(
                    "weight_decay_incr_style",
                    f"'constant' needs start_weight_decay == end_weight_decay (got {start} and {end})",
                    self.weight_decay_incr_style,
                    fix="set scheduler.weight_decay_incr_style to 'linear' or 'cosine', or make both equal",
                )

        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            p.add(
                "use_checkpoint_opt_param_scheduler",
                "override_opt_param_scheduler and use_checkpoint_opt_param_scheduler exclude each other",
                True,
                fix="set one of scheduler.override_opt_param_scheduler / "
                "scheduler.use_checkpoint_opt_param_scheduler to false",
            )

        iters = [n for n in _ITER_FIELDS if _is_given(self, n)]
        samples = [n for n in _SAMPLE_FIELDS if _is_given(self, n)]
        if iters and samples:
            p.add(
                samples[0],
                f"mixes iteration-based ({', '.join(iters)}) and sample-based ({', '.join(samples)}) lengths",
                getattr(self, samples[0]),
                fix="give every scheduler length in iterations or every one in samples, "
                "matching train.train_iters / train.train_samples",
            )
        if self.lr_warmup_fraction is not None:
            for name in ("lr_warmup_iters", "lr_warmup_samples"):
                if _is_given(self, name):
                    p.add(
                        name,
                        "lr_warmup_fraction and an explicit warmup length are both set",
                        getattr(self, name),
                        fix=f"remove scheduler.{name} or scheduler.lr_warmup_fraction",
                    )
        p.raise_if_any()


def _is_given(cfg: SchedulerConfig, name: str) -> bool:
    """Set to something other than "nothing": None for lengths, 0 for the warmup counts."""
    value = getattr(cfg, name)
    return value is not None and not (name.startswith("lr_warmup") and value == 0)


def compute_scheduler_steps(
    scheduler: SchedulerConfig,
    *,
    train_iters: int | None,
    train_samples: int | None,
    global_batch_size: int | None,
) -> None:
    """Derive the scheduler's sample counts (`lr_decay_steps`, ...) from the run length.

    Sample-based runs (`train_samples` given) take `lr_*_samples`; iteration-based runs take
    `lr_*_iters` and multiply by `global_batch_size`. The decay length defaults to `max_steps`, then
    to the run length; WSD annealing defaults to the whole decay; a warmup fraction is a fraction of
    the decay. Warmup must end before the decay does: that is reported, never silently clamped.
    Raises `ConfigError` with every problem; problem paths are full dotted paths.
    """
    s = scheduler
    p = Problems()
    sample_based = train_samples is not None
    wrong = _SAMPLE_FIELDS if not sample_based else (*_ITER_FIELDS, "max_steps")
    mode, unit = ("sample", "samples") if sample_based else ("iteration", "iterations")
    for name in wrong:
        if _is_given(s, name):
            right = (
                name.replace("_samples", "_iters") if not sample_based else name.replace("_iters", "_samples")
            )
            fix = (
                "remove scheduler.max_steps (it only applies to iteration-based runs)"
                if name == "max_steps"
                else f"use scheduler.{right} instead"
            )
            p.add(f"scheduler.{name}", f"does not apply to a {mode}-based run", getattr(s, name), fix=fix)

    if train_samples is not None:
        gbs_factor = 1
        length_name, length = "train.train_samples", train_samples
        decay_user, wsd_user, warmup_user = "lr_decay_samples", "lr_wsd_decay_samples", "lr_warmup_samples"
    else:
        if train_iters is None:
            p.add("train.train_iters", "the run length is not set", None, fix="set train.train_iters")
        if global_batch_size is None:
            p.add("train.global_batch_size", "must be set", None, fix="set train.global_batch_size")
        # Unset values were reported just above and raise below, so their 0 is never used.
        gbs_factor = global_batch_size or 0
        length_name, length = "train.train_iters", train_iters or 0
        decay_user, wsd_user, warmup_user = "lr_decay_iters", "lr_wsd_decay_iters", "lr_warmup_iters"
        if s.max_steps is not None and train_iters is not None and s.max_steps < train_iters:
            p.add(
                "scheduler.max_steps",
                f"({s.max_steps}) is shorter than the run (train.train_iters = {train_iters})",
                s.max_steps,
                fix=f"set scheduler.max_steps >= {train_iters}, or remove it",
            )
    p.raise_if_any()

    # Lengths in the user's unit (iterations or samples), then in samples.
    decay_len = getattr(s, decay_user)
    decay_source = f"scheduler.{decay_user}"
    if decay_len is None and s.max_steps is not None:
        decay_len, decay_source = s.max_steps, "scheduler.max_steps"
    elif decay_len is None:
        decay_len, decay_source = length, length_name
    wd_len = length if sample_based else (s.max_steps or length)
    wsd_len = getattr(s, wsd_user)
    if wsd_len is None and s.lr_decay_style == "WSD":
        wsd_len = decay_len

    decay_steps = decay_len * gbs_factor
    if s.lr_warmup_fraction is not None:
        warmup_steps = int(s.lr_warmup_fraction * decay_steps)
        warmup_source = "scheduler.lr_warmup_fraction"
    else:
        warmup_steps = getattr(s, warmup_user) * gbs_factor
        warmup_source = f"scheduler.{warmup_user}"

    if decay_steps <= 0:
        p.add(
            decay_source,
            f"the learning-rate decay is {decay_steps} samples long; it must be > 0",
            decay_len,
            fix=f"set {decay_source} to a positive number of {unit}",
        )
    elif warmup_steps >= decay_steps:
        warmup_len = getattr(s, warmup_user) if s.lr_warmup_fraction is None else s.lr_warmup_fraction
        p.add(
            warmup_source,
            f"warmup ({warmup_len} -> {warmup_steps} samples) does not end before the learning-rate decay "
            f"({decay_source} = {decay_len} -> {decay_steps} samples)",
            warmup_len,
            fix=(
                "set scheduler.lr_warmup_fraction below 1"
                if s.lr_warmup_fraction is not None
                else f"set {warmup_source} below {decay_len} {unit} (or use scheduler.lr_warmup_fraction), "
                f"or lengthen the decay ({decay_source})"
            ),
        )
    p.raise_if_any()

    why = f"{mode}-based run"
    s.derive("lr_decay_steps", decay_steps, f"{decay_source} in samples ({why})")
    s.derive("lr_warmup_steps", warmup_steps, f"{warmup_source} in samples ({why})")
    s.derive("wd_incr_steps", wd_len * gbs_factor, f"run length in samples ({why})")
    s.derive("wsd_decay_steps", None if wsd_len is None else wsd_len * gbs_factor, f"WSD annealing ({why})")
