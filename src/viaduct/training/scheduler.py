"""Learning-rate and weight-decay schedule of the training loop (Megatron's `OptimizerParamScheduler`).

The scheduler counts **samples**, not optimizer steps: the loop calls `step(increment)` after each
successful update with the number of samples that update consumed (micro batches × micro batch size
× data-parallel size), so a batch-size ramp-up moves the schedule by what was actually trained on.
All lengths (`lr_warmup_steps`, `lr_decay_steps`, ...) are sample counts as derived by
`compute_scheduler_steps()` during `ConfigContainer.validate()`.

Each `step()` writes into every optimizer parameter group:

* ``group["lr"] = get_lr(group) * group.get("lr_mult", 1.0)``, where a group may carry its own
  ``max_lr`` / ``min_lr`` (the decoupled embedding/output learning rate);
* ``group["weight_decay"] = get_wd() * group.get("wd_mult", 1.0)``: the scheduled weight decay
  replaces the optimizer's, so groups that must not decay (biases, norms) carry ``wd_mult = 0``.

The schedule's values are not checked here: `build_scheduler()` passes those of a config that
`ConfigContainer.validate()` accepted, which is where every rule on them lives. The exception is a
schedule taken from a checkpoint file (below), which no validation has seen.

Resume rules: `override_opt_param_scheduler` keeps this run's schedule quietly,
`use_checkpoint_opt_param_scheduler` takes the checkpoint's (checked first: a file is untrusted),
and otherwise this run's wins and every difference is logged. The sample count always comes from
the checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

import torch

from viaduct.config import ConfigError, Problem, Problems

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")

# Schedule values kept in the state dict -> the config field each comes from (for error messages).
# The first ten keys are Megatron Core's own names, so a Megatron scheduler state dict loads here;
# the last three are extra (absent from Megatron checkpoints, in which case this run's value is kept).
_FIELD_OF: dict[str, str] = {
    "max_lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_steps": "scheduler.lr_warmup_steps",
    "lr_decay_steps": "scheduler.lr_decay_steps",
    "lr_decay_style": "scheduler.lr_decay_style",
    "start_wd": "scheduler.start_weight_decay",
    "end_wd": "scheduler.end_weight_decay",
    "wd_incr_steps": "scheduler.wd_incr_steps",
    "wd_incr_style": "scheduler.weight_decay_incr_style",
    "init_lr": "scheduler.lr_warmup_init",
    "wsd_decay_steps": "scheduler.wsd_decay_steps",
    "lr_wsd_decay_style": "scheduler.lr_wsd_decay_style",
}
_WSD_ONLY = ("wsd_decay_steps", "lr_wsd_decay_style")

log = logging.getLogger("viaduct")


class HasParamGroups(Protocol):
    """Anything with torch-style `param_groups` (a `torch.optim.Optimizer` or a wrapper of one)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups; the scheduler writes lr and weight_decay into them."""
        ...


class OptimizerParamScheduler:
    """Anneals the learning rate and weight decay of `optimizer`'s parameter groups, by samples."""

    def __init__(
        self,
        optimizer: HasParamGroups,
        *,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool = False,
        override_opt_param_scheduler: bool = False,
        wsd_decay_steps: int | None = None,
        lr_wsd_decay_style: str | None = None,
    ) -> None:
        self.optimizer = optimizer
        # Plain Python numbers: the state dict must load with torch.load(weights_only=True).
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.lr_decay_steps = int(lr_decay_steps)
        self.lr_decay_style = str(lr_decay_style)
        self.wsd_decay_steps = None if wsd_decay_steps is None else int(wsd_decay_steps)
        self.lr_wsd_decay_style = None if lr_wsd_decay_style is None else str(lr_wsd_decay_style)
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps)
        self.wd_incr_style = str(wd_incr_style)
        self.use_checkpoint_opt_param_scheduler = bool(use_checkpoint_opt_param_scheduler)
        self.override_opt_param_scheduler = bool(override_opt_param_scheduler)
        self.num_steps = 0
        """Samples consumed so far (the schedule's clock)."""
        self.step(0)

    # ------------------------------------------------------------------ schedule

    def get_wd(self) -> float:
        """Weight decay after `num_steps` samples."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine: slow start, slow finish
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: dict[str, Any]) -> float:
        """Learning rate of `param_group` after `num_steps` samples (before its `lr_mult`)."""
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        n = self.num_steps

        if self.lr_warmup_steps > 0 and n <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * n / self.lr_warmup_steps
        # Megatron's order: a constant schedule stays at the peak even past lr_decay_steps.
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            # `** 0.5`, not math.sqrt: Megatron's expression, whose rounding differs in the last bit.
            lr = max_lr * max(self.lr_warmup_steps, 1) ** 0.5 / (max(n, 1) ** 0.5)
            return max(min_lr, lr)

        if self.lr_decay_style == "WSD":
            assert self.wsd_decay_steps is not None  # validation derives it for every WSD schedule
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if n <= anneal_start:
                coeff = 1.0
            else:
                r = (n - anneal_start) / self.wsd_decay_steps
                coeff = _wsd_coeff(self.lr_wsd_decay_style, r)
        else:
            ratio = (n - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
            if self.lr_decay_style == "linear":
                coeff = 1.0 - ratio
            else:  # cosine
                coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        """Advance the schedule by `increment` samples and write lr / weight decay into every group."""
        if increment < 0:
            raise ValueError(f"the scheduler moves forward only; got increment {increment}")
        self.num_steps += int(increment)
        wd = self.get_wd()
        for group in self.optimizer.param_groups:
            _assign(group, "lr", self.get_lr(group) * group.get("lr_mult", 1.0))
            _assign(group, "weight_decay", wd * group.get("wd_mult", 1.0))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The schedule and the sample count, as plain Python values (safe for weights_only loading)."""
        state: dict[str, Any] = {key: getattr(self, key) for key in _FIELD_OF}
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint: the sample count always; the schedule per the resume rules.

        `use_checkpoint_opt_param_scheduler` takes the checkpoint's schedule;
        `override_opt_param_scheduler` keeps this run's quietly; with neither, this run's values win
        too (a longer `train_iters` or a new `lr` is a deliberate change on resume), and every value
        that differs from the checkpoint's is logged. Keys missing from `state` (older or Megatron
        checkpoints) keep this run's value.
        """
        _check_checkpoint_state(state)
        taken: dict[str, Any] = {}
        changed: list[str] = []
        for key, field in _FIELD_OF.items():
            if key not in state or self.override_opt_param_scheduler:
                continue
            mine, theirs = getattr(self, key), state[key]
            if self.use_checkpoint_opt_param_scheduler:
                taken[key] = theirs
            elif mine != theirs and not self._inert(key, state):
                unit = " samples" if key.endswith("_steps") else ""
                changed.append(f"{field}: {theirs!r}{unit} in the checkpoint -> {mine!r}{unit} now")
        if changed:
            log.warning(
                "the learning-rate schedule changed on resume; it continues from sample %d with this "
                "run's values (scheduler.use_checkpoint_opt_param_scheduler=true keeps the checkpoint's):"
                "\n  %s",
                int(state["num_steps"]),
                "\n  ".join(changed),
            )
        if taken:
            _check_checkpoint_schedule({key: getattr(self, key) for key in _FIELD_OF} | taken)
        for key, value in taken.items():
            setattr(self, key, value)
        self.num_steps = int(state["num_steps"])
        self.step(0)

    def _inert(self, key: str, state: dict[str, Any]) -> bool:
        """True when `key` can no longer shape the rest of this run, so a difference is not worth
        reporting: the WSD fields outside WSD, and the warmup start once warmup is over."""
        if key in _WSD_ONLY:
            return self.lr_decay_style != "WSD"
        if key == "init_lr":
            # At num_steps == warmup the warmup formula already gives max_lr whatever init_lr is.
            return int(state.get("num_steps", 0)) >= self.lr_warmup_steps
        return False


def _wsd_coeff(style: str | None, r: float) -> float:
    """Fraction of (max_lr - min_lr) left after a share `r` in (0, 1] of the WSD annealing phase."""
    if style == "linear":
        return 1.0 - r
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * r) + 1.0)
    if style == "exponential":
        return 2.0 * 0.5**r - 1.0
    return 1.0 - math.sqrt(r)  # minus_sqrt (the only style left: validation allows no other)


def _assign(group: dict[str, Any], key: str, value: float) -> None:
    # A tensor lr (capturable / compiled optimizers) is updated in place so the captured tensor stays
    # the one the optimizer reads; fill_ with a Python float does not synchronise with the device.
    current = group.get(key)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


def _is_number(value: object, *, low: float = -math.inf) -> bool:
    """A finite real number >= `low` (True and False are not numbers here)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= low
    )


_CHECKPOINT_FIX = (
    "load a checkpoint with a valid schedule, or set scheduler.use_checkpoint_opt_param_scheduler=false "
    "to use this run's"
)


def _check_checkpoint_state(state: dict[str, Any]) -> None:
    """A scheduler state read from a checkpoint is a dict with a sample count; anything else is a
    damaged or foreign file, refused with a `ConfigError` rather than a raw traceback."""
    num_steps = state.get("num_steps") if isinstance(state, dict) else None
    if not _is_number(num_steps, low=0):
        raise ConfigError(
            Problem(
                "checkpoint.load",
                "the checkpoint's scheduler state has no valid sample count (num_steps)",
                num_steps,
                fix="load an intact checkpoint, or another step (checkpoint.ckpt_step)",
            )
        )


def _check_checkpoint_schedule(v: dict[str, Any]) -> None:
    """Refuse a schedule taken from a checkpoint (`use_checkpoint_opt_param_scheduler`) that no valid
    config gives: it comes from a file, and no config validation has seen it."""
    p = Problems()

    def refuse(key: str, rule: str) -> None:
        p.add(_FIELD_OF[key], f"the checkpoint's {key} {rule}", v[key], fix=_CHECKPOINT_FIX)

    for key in ("max_lr", "min_lr", "init_lr", "start_wd", "end_wd"):
        if not _is_number(v[key]):
            refuse(key, "must be a finite number")
    for key in ("lr_warmup_steps", "lr_decay_steps", "wd_incr_steps"):
        if not _is_number(v[key], low=0):
            refuse(key, "must be a number of samples >= 0")
    for key, styles in (("lr_decay_style", LR_DECAY_STYLES), ("wd_incr_style", WD_INCR_STYLES)):
        if v[key] not in styles:
            refuse(key, f"must be one of {', '.join(styles)}")
    p.raise_if_any()  # the rules below compare these values

    if not 0 <= v["min_lr"] <= v["max_lr"]:
        refuse("min_lr", f"must lie in [0, max_lr] = [0, {v['max_lr']}]")
    if not 0 <= v["init_lr"] <= v["max_lr"]:
        refuse("init_lr", f"must lie in [0, max_lr] = [0, {v['max_lr']}]")
    # A constant schedule never reaches the decay, so its length does not matter.
    if v["lr_decay_style"] != "constant" and v["lr_warmup_steps"] >= v["lr_decay_steps"]:
        refuse("lr_decay_steps", f"must be longer than the warmup ({v['lr_warmup_steps']} samples)")
    if v["lr_decay_style"] == "WSD":
        if not (_is_number(v["wsd_decay_steps"]) and v["wsd_decay_steps"] > 0):
            refuse("wsd_decay_steps", "must be > 0 samples for the WSD schedule")
        if v["lr_wsd_decay_style"] not in WSD_DECAY_STYLES:
            refuse("lr_wsd_decay_style", f"must be one of {', '.join(WSD_DECAY_STYLES)}")
    if not 0 <= v["start_wd"] <= v["end_wd"]:
        refuse("start_wd", f"must lie in [0, end_wd] = [0, {v['end_wd']}]")
    if v["wd_incr_style"] == "constant" and v["start_wd"] != v["end_wd"]:
        refuse(
            "wd_incr_style", f"'constant' needs start_wd == end_wd (got {v['start_wd']} and {v['end_wd']})"
        )
    elif v["wd_incr_style"] != "constant" and v["wd_incr_steps"] <= 0:
        refuse("wd_incr_steps", f"must be > 0 samples for the '{v['wd_incr_style']}' weight-decay schedule")
    p.raise_if_any()


def build_scheduler(cfg: ConfigContainer, optimizer: HasParamGroups) -> OptimizerParamScheduler:
    """The scheduler of a validated config; sets the optimizer's lr / weight decay for sample 0."""
    s, o = cfg.scheduler, cfg.optimizer
    if s.lr_decay_steps is None or s.lr_warmup_steps is None or s.wd_incr_steps is None or o.lr is None:
        raise ConfigError(
            Problem(
                "scheduler.lr_decay_steps",
                "the scheduler's sample counts are not derived yet",
                fix="call cfg.validate() before build_scheduler(cfg, optimizer)",
            )
        )
    if s.start_weight_decay is None or s.end_weight_decay is None:
        # Unset schedule: the optimizer's weight decay throughout (validate() sets both or neither).
        start_wd = end_wd = o.weight_decay
    else:
        start_wd, end_wd = s.start_weight_decay, s.end_weight_decay
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=s.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr or 0.0,
        lr_warmup_steps=s.lr_warmup_steps,
        lr_decay_steps=s.lr_decay_steps,
        lr_decay_style=s.lr_decay_style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=s.wd_incr_steps,
        wd_incr_style=s.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=s.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=s.override_opt_param_scheduler,
        wsd_decay_steps=s.wsd_decay_steps,
        lr_wsd_decay_style=s.lr_wsd_decay_style,
    )
    scheduler.step(0)  # the constructor already did; kept so the contract holds if that changes
    return scheduler
