"""`OptimizerParamScheduler` and `build_scheduler` against hand-computed learning rates and weight decays.

Unless a test says otherwise the schedule is: lr_warmup_init 0.2, peak 1.0, floor 0.1, warmup 100
samples, decay until sample 1100 (so the decay proper spans 1000 samples), weight decay 0.1. Every
expected number is a literal with its arithmetic in a comment; all counts are samples.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.recipes import get_recipe
from viaduct.training.scheduler import OptimizerParamScheduler, build_scheduler

approx = pytest.approx


def make_optimizer(*extra_groups: dict[str, Any]) -> torch.optim.Optimizer:
    """A real SGD over one small parameter, plus any extra groups (one parameter each)."""
    groups: list[dict[str, Any]] = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    groups += [{"params": [torch.nn.Parameter(torch.zeros(2))], **g} for g in extra_groups]
    return torch.optim.SGD(groups, lr=123.0, weight_decay=0.5)  # both overwritten by the scheduler


def make(optimizer: torch.optim.Optimizer | None = None, **kw: Any) -> OptimizerParamScheduler:
    args: dict[str, Any] = {
        "init_lr": 0.2,
        "max_lr": 1.0,
        "min_lr": 0.1,
        "lr_warmup_steps": 100,
        "lr_decay_steps": 1100,
        "lr_decay_style": "linear",
        "start_wd": 0.1,
        "end_wd": 0.1,
        "wd_incr_steps": 1100,
        "wd_incr_style": "constant",
    }
    args.update(kw)
    return OptimizerParamScheduler(optimizer or make_optimizer(), **args)


def lr_at(s: OptimizerParamScheduler, samples: int, group: int = 0) -> float:
    """Move the schedule to `samples` and return the lr written into param group `group`."""
    s.step(samples - s.num_steps)
    return s.optimizer.param_groups[group]["lr"]


# ---------------------------------------------------------------------------------------- learning rate


def test_warmup_starts_at_lr_warmup_init_and_reaches_the_peak():
    s = make()
    assert s.optimizer.param_groups[0]["lr"] == approx(0.2)  # constructor applied sample 0: init_lr
    assert lr_at(s, 25) == approx(0.4)  # 0.2 + (1.0 - 0.2) * 25/100
    assert lr_at(s, 50) == approx(0.6)  # 0.2 + 0.8 * 0.5
    assert lr_at(s, 100) == approx(1.0)  # end of warmup: the peak


def test_linear_decay():
    s = make(lr_decay_style="linear")
    assert lr_at(s, 350) == approx(0.775)  # ratio (350-100)/1000 = 0.25; 0.1 + (1 - 0.25) * 0.9
    assert lr_at(s, 600) == approx(0.55)  # ratio 0.5; 0.1 + 0.5 * 0.9
    assert lr_at(s, 1100) == approx(0.1)  # ratio 1: the floor


def test_cosine_decay():
    s = make(lr_decay_style="cosine")
    # ratio 0.25: coeff 0.5 * (cos(pi/4) + 1) = 0.5 * 1.70710678 = 0.85355339; 0.1 + 0.9 * 0.85355339
    assert lr_at(s, 350) == approx(0.86819805)
    assert lr_at(s, 600) == approx(0.55)  # half of the decay: (max + min) / 2 = (1.0 + 0.1) / 2
    assert lr_at(s, 1100) == approx(0.1)  # cos(pi) = -1: coeff 0


def test_constant_stays_at_the_peak_even_past_the_decay_length():
    s = make(lr_decay_style="constant")
    assert lr_at(s, 50) == approx(0.6)  # warmup still applies: 0.2 + 0.8 * 50/100
    assert lr_at(s, 600) == approx(1.0)
    assert lr_at(s, 5000) == approx(1.0)  # Megatron's order: "constant" is decided before the floor


def test_constant_needs_no_decay_length():
    s = make(lr_decay_style="constant", lr_warmup_steps=0, lr_decay_steps=0)
    assert lr_at(s, 0) == approx(1.0)


def test_inverse_square_root():
    s = make(lr_decay_style="inverse-square-root", lr_decay_steps=100_000, min_lr=0.2)
    assert lr_at(s, 400) == approx(0.5)  # 1.0 * sqrt(100) / sqrt(400) = 10 / 20
    assert lr_at(s, 2500) == approx(0.2)  # 10 / 50 = 0.2
    assert lr_at(s, 10_000) == approx(0.2)  # 10 / 100 = 0.1, floored at min_lr 0.2


def test_inverse_square_root_without_warmup_uses_one_sample():
    s = make(lr_decay_style="inverse-square-root", lr_warmup_steps=0, lr_decay_steps=100_000, min_lr=0.0)
    assert lr_at(s, 0) == approx(1.0)  # sqrt(max(0, 1)) / sqrt(max(0, 1)) = 1
    assert lr_at(s, 4) == approx(0.5)  # sqrt(1) / sqrt(4)


@pytest.mark.parametrize(
    ("style", "at_quarter"),
    [
        # annealing from sample 800 (= 1000 - 200) to 1000; at sample 850 r = 50/200 = 0.25
        ("linear", 0.775),  # coeff 1 - 0.25 = 0.75; 0.1 + 0.75 * 0.9
        ("cosine", 0.86819805),  # coeff 0.5 * (cos(pi/4) + 1) = 0.85355339; 0.1 + 0.9 * 0.85355339
        ("exponential", 0.71361355),  # coeff 2 * 0.5**0.25 - 1 = 2 * 0.84089642 - 1 = 0.68179283
        ("minus_sqrt", 0.55),  # coeff 1 - sqrt(0.25) = 0.5; 0.1 + 0.5 * 0.9
    ],
)
def test_wsd_every_annealing_style(style, at_quarter):
    s = make(
        lr_decay_style="WSD",
        lr_warmup_steps=0,
        lr_decay_steps=1000,
        wsd_decay_steps=200,
        lr_wsd_decay_style=style,
    )
    assert lr_at(s, 0) == approx(1.0)  # no warmup: stable phase at the peak
    assert lr_at(s, 800) == approx(1.0)  # last sample of the stable phase
    assert lr_at(s, 850) == approx(at_quarter)
    assert lr_at(s, 1000) == approx(0.1)  # r = 1: every style's coeff is 0
    assert lr_at(s, 1001) == approx(0.1)  # past the decay: the floor


def test_wsd_exponential_half_way():
    s = make(lr_decay_style="WSD", lr_decay_steps=1000, wsd_decay_steps=200, lr_wsd_decay_style="exponential")
    # r = (900 - 800) / 200 = 0.5: coeff 2 * 0.70710678 - 1 = 0.41421356; 0.1 + 0.9 * 0.41421356
    assert lr_at(s, 900) == approx(0.47279221)


@pytest.mark.parametrize("style", ["linear", "cosine", "inverse-square-root"])
def test_floor_at_min_lr_after_the_decay(style):
    s = make(lr_decay_style=style)
    assert lr_at(s, 1101) == approx(0.1)
    assert lr_at(s, 50_000) == approx(0.1)


def test_decoupled_group_max_and_min_lr():
    opt = make_optimizer({"max_lr": 2.0, "min_lr": 0.0})
    s = make(opt, lr_decay_style="cosine")
    assert lr_at(s, 50, group=0) == approx(0.6)  # 0.2 + (1.0 - 0.2) * 0.5
    assert lr_at(s, 50, group=1) == approx(1.1)  # same init_lr, group's peak: 0.2 + (2.0 - 0.2) * 0.5
    assert lr_at(s, 600, group=0) == approx(0.55)  # (1.0 + 0.1) / 2
    assert lr_at(s, 600, group=1) == approx(1.0)  # (2.0 + 0.0) / 2
    assert lr_at(s, 2000, group=1) == approx(0.0)  # the group's own floor


def test_lr_mult_and_wd_mult():
    opt = make_optimizer({"wd_mult": 0.0, "lr_mult": 0.5})
    s = make(opt, start_wd=0.0, end_wd=0.1, wd_incr_style="linear", wd_incr_steps=1000)
    assert lr_at(s, 600, group=0) == approx(0.55)  # linear, ratio 0.5: 0.1 + 0.5 * 0.9
    assert opt.param_groups[1]["lr"] == approx(0.275)  # lr_mult 0.5 × 0.55
    assert opt.param_groups[0]["weight_decay"] == approx(0.06)  # 600/1000 of the way from 0.0 to 0.1
    for samples in (600, 1000, 3000):
        s.step(samples - s.num_steps)
        assert opt.param_groups[1]["weight_decay"] == 0.0  # no-decay group (biases, norms) stays at 0
    assert opt.param_groups[0]["weight_decay"] == approx(0.1)


def test_tensor_lr_is_updated_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=torch.tensor(0.01), foreach=False)
    lr_tensor = opt.param_groups[0]["lr"]
    s = make(opt)
    s.step(50)
    assert opt.param_groups[0]["lr"] is lr_tensor  # the optimizer keeps reading the same tensor
    assert float(lr_tensor) == approx(0.6)  # 0.2 + 0.8 * 50/100


# ---------------------------------------------------------------------------------------- weight decay


def test_weight_decay_linear():
    s = make(start_wd=0.0, end_wd=0.1, wd_incr_steps=1000, wd_incr_style="linear")
    assert s.get_wd() == approx(0.0)
    s.step(250)
    assert s.get_wd() == approx(0.025)  # 0.0 + 0.25 * 0.1
    assert s.optimizer.param_groups[0]["weight_decay"] == approx(0.025)
    s.step(750)
    assert s.get_wd() == approx(0.1)
    s.step(1000)
    assert s.get_wd() == approx(0.1)  # past wd_incr_steps: end_wd


def test_weight_decay_cosine():
    s = make(start_wd=0.0, end_wd=0.1, wd_incr_steps=1000, wd_incr_style="cosine")
    s.step(250)
    # coeff 0.5 * (cos(pi * (1 - 0.25)) + 1) = 0.5 * (1 - 0.70710678) = 0.14644661; times 0.1
    assert s.get_wd() == approx(0.014644661)
    s.step(250)
    assert s.get_wd() == approx(0.05)  # half way: cos(pi/2) = 0, coeff 0.5
    s.step(500)
    assert s.get_wd() == approx(0.1)


def test_weight_decay_constant_overwrites_the_optimizers():
    s = make(start_wd=0.033, end_wd=0.033)
    assert s.optimizer.param_groups[0]["weight_decay"] == approx(0.033)  # SGD was built with 0.5


# ---------------------------------------------------------------------------------------- counted in samples


def test_step_moves_by_samples():
    # global batch 8, warmup 10 iterations = 80 samples, decay 100 iterations = 800 samples
    s = make(init_lr=0.0, lr_warmup_steps=80, lr_decay_steps=800)
    for _ in range(5):
        s.step(8)  # one optimizer step of a global batch of 8
    assert s.num_steps == 40
    assert s.optimizer.param_groups[0]["lr"] == approx(0.5)  # 1.0 * 40/80


def test_uneven_increments_follow_samples_not_calls():
    # batch-size ramp-up: 8, 8, 16, 16, 32 samples per step -> 80 samples after 5 calls
    ramp = make(lr_decay_style="cosine", lr_warmup_steps=40, lr_decay_steps=120)
    for inc in (8, 8, 16, 16, 32):
        ramp.step(inc)
    once = make(lr_decay_style="cosine", lr_warmup_steps=40, lr_decay_steps=120)
    once.step(80)
    assert ramp.num_steps == once.num_steps == 80
    # ratio (80 - 40) / (120 - 40) = 0.5: (1.0 + 0.1) / 2; after 5 calls, not 5 samples
    assert ramp.optimizer.param_groups[0]["lr"] == approx(0.55)
    assert once.optimizer.param_groups[0]["lr"] == approx(0.55)


def test_negative_increment_is_refused():
    with pytest.raises(ValueError, match="forward"):
        make().step(-8)


# ---------------------------------------------------------------------------------------- checkpointing


def test_state_dict_round_trip_through_torch_save(tmp_path):
    s = make(lr_decay_style="WSD", lr_decay_steps=1000, wsd_decay_steps=200, lr_wsd_decay_style="cosine")
    s.step(850)
    torch.save(s.state_dict(), tmp_path / "sched.pt")
    state = torch.load(tmp_path / "sched.pt", weights_only=True)
    assert state == s.state_dict()
    assert all(v is None or type(v) in (int, float, str) for v in state.values())

    fresh = make(lr_decay_style="WSD", lr_decay_steps=1000, wsd_decay_steps=200, lr_wsd_decay_style="cosine")
    assert fresh.optimizer.param_groups[0]["lr"] == approx(0.2)  # sample 0: warmup start
    fresh.load_state_dict(state)
    assert fresh.num_steps == 850
    assert fresh.optimizer.param_groups[0]["lr"] == approx(0.86819805)  # WSD cosine at r = 0.25


def test_load_with_a_changed_schedule_keeps_this_runs_values_and_logs_each_change(caplog):
    old = make()
    old.step(400)
    new = make(max_lr=2.0, lr_decay_steps=2200)  # e.g. a longer run with a higher peak
    with caplog.at_level("WARNING", logger="viaduct"):
        new.load_state_dict(old.state_dict())
    assert (new.max_lr, new.lr_decay_steps, new.num_steps) == (2.0, 2200, 400)  # samples from checkpoint
    text = caplog.text
    assert "optimizer.lr: 1.0 in the checkpoint -> 2.0 now" in text
    assert "scheduler.lr_decay_steps: 1100 samples in the checkpoint -> 2200 samples now" in text
    assert "scheduler.use_checkpoint_opt_param_scheduler" in text
    # linear, ratio (400 - 100) / (2200 - 100) = 1/7: 0.1 + (6/7) * (2.0 - 0.1) = 1.72857143
    assert new.optimizer.param_groups[0]["lr"] == approx(1.72857143)


def test_load_override_keeps_this_runs_schedule():
    old = make()
    old.step(400)
    new = make(max_lr=2.0, lr_decay_steps=2200, override_opt_param_scheduler=True)
    new.load_state_dict(old.state_dict())
    assert (new.max_lr, new.lr_decay_steps, new.num_steps) == (2.0, 2200, 400)  # samples from checkpoint
    # linear, ratio (400 - 100) / (2200 - 100) = 1/7: 0.1 + (6/7) * (2.0 - 0.1) = 1.72857143
    assert new.optimizer.param_groups[0]["lr"] == approx(1.72857143)


def test_load_use_checkpoint_takes_the_checkpoints_schedule():
    old = make()
    old.step(400)
    new = make(max_lr=2.0, lr_decay_steps=2200, use_checkpoint_opt_param_scheduler=True)
    new.load_state_dict(old.state_dict())
    assert (new.max_lr, new.lr_decay_steps, new.num_steps) == (1.0, 1100, 400)
    assert new.optimizer.param_groups[0]["lr"] == approx(0.73)  # ratio 0.3: 0.1 + 0.7 * 0.9


def test_load_ignores_values_that_no_longer_matter():
    old = make()
    old.step(400)
    # warmup is over and the schedule is not WSD: init_lr and the WSD annealing style cannot matter
    new = make(init_lr=0.0, lr_wsd_decay_style="linear")
    new.load_state_dict(old.state_dict())
    assert new.num_steps == 400


def test_load_a_megatron_state_dict_without_the_extra_keys():
    megatron = {
        "max_lr": 1.0,
        "lr_warmup_steps": 100,
        "num_steps": 600,
        "lr_decay_style": "linear",
        "lr_decay_steps": 1100,
        "min_lr": 0.1,
        "start_wd": 0.1,
        "end_wd": 0.1,
        "wd_incr_style": "constant",
        "wd_incr_steps": 1100,
    }
    s = make()
    s.load_state_dict(megatron)
    assert s.optimizer.param_groups[0]["lr"] == approx(0.55)  # ratio 0.5: 0.1 + 0.5 * 0.9


def test_load_use_checkpoint_refuses_a_schedule_no_config_gives():
    """The checkpoint's schedule comes from a file no validation has seen: every bad value is named,
    with the config field it stands for, and nothing is taken."""
    old = make()
    old.step(400)
    state = old.state_dict() | {
        "min_lr": 2.0,  # above max_lr 1.0
        "lr_decay_style": "steep",
        "lr_warmup_steps": "100",  # not a number
        "end_wd": float("nan"),
    }
    new = make(use_checkpoint_opt_param_scheduler=True)
    with pytest.raises(ConfigError) as info:
        new.load_state_dict(state)
    problems = {p.path: p for p in info.value.problems}
    assert set(problems) == {
        "scheduler.lr_warmup_steps",
        "scheduler.lr_decay_style",
        "scheduler.end_weight_decay",
    }  # type and style problems first; the ranges are compared once the types are sound
    assert "use_checkpoint_opt_param_scheduler=false" in problems["scheduler.lr_decay_style"].fix
    assert (new.min_lr, new.lr_decay_style, new.num_steps) == (0.1, "linear", 0)  # nothing taken

    state = old.state_dict() | {"min_lr": 2.0, "lr_warmup_steps": 1100, "init_lr": -0.5}
    with pytest.raises(ConfigError) as info:
        new.load_state_dict(state)
    assert {p.path for p in info.value.problems} == {
        "optimizer.min_lr",  # above the checkpoint's peak
        "scheduler.lr_warmup_init",  # below 0
        "scheduler.lr_decay_steps",  # the warmup (1100 samples) does not end before the decay (1100)
    }


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        (
            {"lr_decay_style": "WSD", "wsd_decay_steps": None, "lr_wsd_decay_style": "cosine"},
            "scheduler.wsd_decay_steps",
        ),
        (
            {"lr_decay_style": "WSD", "wsd_decay_steps": 200, "lr_wsd_decay_style": "steep"},
            "scheduler.lr_wsd_decay_style",
        ),
        ({"start_wd": 0.0, "end_wd": 0.1}, "scheduler.weight_decay_incr_style"),  # 'constant' ramp
        ({"wd_incr_style": "linear", "wd_incr_steps": 0}, "scheduler.wd_incr_steps"),
        ({"start_wd": 0.2, "end_wd": 0.1, "wd_incr_style": "linear"}, "scheduler.start_weight_decay"),
        ({"max_lr": True}, "optimizer.lr"),  # a bool is not a learning rate
    ],
)
def test_load_use_checkpoint_checks_each_schedule_rule(changes, path):
    old = make()
    new = make(use_checkpoint_opt_param_scheduler=True)
    with pytest.raises(ConfigError) as info:
        new.load_state_dict(old.state_dict() | changes)
    assert [p.path for p in info.value.problems] == [path]


@pytest.mark.parametrize(
    "state", [{"max_lr": 1.0}, {"num_steps": "400"}, {"num_steps": -8}, [("num_steps", 400)]]
)
def test_load_a_damaged_scheduler_state_is_a_config_error(state):
    with pytest.raises(ConfigError, match="sample count") as info:
        make().load_state_dict(state)
    assert info.value.problems[0].path == "checkpoint.load"


# ---------------------------------------------------------------------------------------- build_scheduler


def _config(**scheduler: Any):
    cfg = get_recipe("default")()
    cfg.train.train_iters = 100
    cfg.train.global_batch_size = 8
    cfg.train.micro_batch_size = 8
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.min_lr = 1e-4
    cfg.optimizer.weight_decay = 0.05
    cfg.scheduler.lr_decay_style = "linear"
    cfg.scheduler.lr_warmup_fraction, cfg.scheduler.lr_warmup_iters = None, 10
    cfg.scheduler.lr_warmup_init = 0.0
    cfg.scheduler.start_weight_decay = None
    cfg.scheduler.end_weight_decay = None
    cfg.scheduler.weight_decay_incr_style = "constant"
    for name, value in scheduler.items():
        setattr(cfg.scheduler, name, value)
    return cfg.validate(world_size=1)


def _adamw() -> torch.optim.AdamW:
    weight = torch.nn.Parameter(torch.ones(3, 2))
    bias = torch.nn.Parameter(torch.ones(3))
    return torch.optim.AdamW([{"params": [weight]}, {"params": [bias], "wd_mult": 0.0}], lr=0.5)


def test_build_scheduler_from_a_validated_config():
    cfg = _config()
    opt = _adamw()
    s = build_scheduler(cfg, opt)
    # 100 iterations × 8 = 800 samples of decay, 10 × 8 = 80 of warmup
    assert (s.lr_decay_steps, s.lr_warmup_steps, s.wd_incr_steps) == (800, 80, 800)
    assert (s.max_lr, s.min_lr, s.init_lr) == (1e-3, 1e-4, 0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # step(0): warmup starts at lr_warmup_init
    # unset start/end weight decay: optimizer.weight_decay throughout; the bias group has wd_mult 0
    assert [g["weight_decay"] for g in opt.param_groups] == [approx(0.05), 0.0]

    for _ in range(5):  # five optimizer steps of a global batch of 8 samples
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        s.step(cfg.train.global_batch_size)
    assert s.num_steps == 40
    assert opt.param_groups[0]["lr"] == approx(5e-4)  # 1e-3 * 40/80
    s.step(400)  # sample 440: ratio (440 - 80) / (800 - 80) = 0.5
    assert opt.param_groups[0]["lr"] == approx(5.5e-4)  # 1e-4 + 0.5 * 9e-4


def test_build_scheduler_with_a_weight_decay_schedule_and_min_lr_unset():
    cfg = _config(start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="linear")
    cfg.optimizer.min_lr = None
    cfg.validate(world_size=1)
    opt = _adamw()
    s = build_scheduler(cfg, opt)
    assert s.min_lr == 0.0
    s.step(200)
    assert opt.param_groups[0]["weight_decay"] == approx(0.025)  # 200/800 of the way from 0.0 to 0.1
    assert opt.param_groups[1]["weight_decay"] == 0.0
    s.step(600)
    assert opt.param_groups[0]["lr"] == approx(0.0)  # end of the linear decay: min_lr None -> 0


def test_build_scheduler_wsd_from_config():
    cfg = _config(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style="linear")
    s = build_scheduler(cfg, _adamw())
    assert s.wsd_decay_steps == 160  # 20 iterations × 8
    s.step(720)  # annealing from 800 - 160 = 640; r = (720 - 640) / 160 = 0.5
    assert s.optimizer.param_groups[0]["lr"] == approx(5.5e-4)  # 1e-4 + 0.5 * 9e-4


def test_build_scheduler_needs_a_validated_config():
    cfg = get_recipe("default")()
    with pytest.raises(ConfigError, match="validate"):
        build_scheduler(cfg, _adamw())


# ------------------------------------------------------------------------------------- where the rules live


def _validate(**fields: Any) -> list[str]:
    """Problem paths of `validate()` for the `_config()` baseline with dotted `fields` changed."""
    cfg = get_recipe("default")()
    cfg.train.train_iters = 100
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 8
    cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.weight_decay = 1e-3, 1e-4, 0.05
    cfg.scheduler.lr_decay_style = "linear"
    cfg.scheduler.lr_warmup_fraction, cfg.scheduler.lr_warmup_iters = None, 10
    cfg.scheduler.start_weight_decay = cfg.scheduler.end_weight_decay = None
    cfg.scheduler.weight_decay_incr_style = "constant"
    for dotted, value in fields.items():
        component, name = dotted.split("__")
        setattr(getattr(cfg, component), name, value)
    try:
        cfg.validate(world_size=1)
    except ConfigError as exc:
        return [p.path for p in exc.problems]
    return []


LINEAR_WD = {"scheduler__weight_decay_incr_style": "linear"}


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"scheduler__lr_decay_style": "steep"}, "scheduler.lr_decay_style"),
        ({"scheduler__weight_decay_incr_style": "exp"}, "scheduler.weight_decay_incr_style"),
        ({"optimizer__min_lr": -1e-4}, "optimizer.min_lr"),  # floor below 0
        ({"optimizer__min_lr": 2e-3}, "optimizer.min_lr"),  # floor above the peak (1e-3)
        ({"scheduler__lr_warmup_init": -1.0}, "scheduler.lr_warmup_init"),
        ({"scheduler__lr_warmup_init": 1.0}, "scheduler.lr_warmup_init"),  # above the peak
        ({"scheduler__lr_warmup_iters": -1}, "scheduler.lr_warmup_iters"),
        ({"scheduler__lr_decay_iters": 0}, "scheduler.lr_decay_iters"),  # an empty decay
        ({"scheduler__lr_warmup_iters": 100}, "scheduler.lr_warmup_iters"),  # warmup not before the decay
        (
            {"scheduler__lr_decay_style": "WSD", "scheduler__lr_wsd_decay_iters": 0},
            "scheduler.lr_wsd_decay_iters",
        ),
        (
            {"scheduler__lr_decay_style": "WSD", "scheduler__lr_wsd_decay_style": "steep"},
            "scheduler.lr_wsd_decay_style",
        ),
        (
            {"scheduler__start_weight_decay": -0.1, "scheduler__end_weight_decay": 0.1, **LINEAR_WD},
            "scheduler.start_weight_decay",
        ),
        (
            {"scheduler__start_weight_decay": 0.1, "scheduler__end_weight_decay": 0.0, **LINEAR_WD},
            "scheduler.end_weight_decay",
        ),
        (
            {"scheduler__start_weight_decay": 0.0, "scheduler__end_weight_decay": 0.1},
            "scheduler.weight_decay_incr_style",  # 'constant' with start != end
        ),
        (
            {
                "train__train_iters": 0,
                "scheduler__start_weight_decay": 0.0,
                "scheduler__end_weight_decay": 0.1,
                **LINEAR_WD,
            },
            "train.train_iters",  # a weight-decay ramp over no samples
        ),
        (
            {
                "scheduler__override_opt_param_scheduler": True,
                "scheduler__use_checkpoint_opt_param_scheduler": True,
            },
            "scheduler.use_checkpoint_opt_param_scheduler",
        ),
    ],
)
def test_config_validation_refuses_every_schedule_the_scheduler_cannot_run(fields, path):
    """The scheduler trusts its values: each rule on them lives in the config validation, once."""
    assert _validate() == []  # the baseline is valid
    assert path in _validate(**fields)


def test_config_validation_reports_every_schedule_problem_at_once():
    paths = _validate(optimizer__min_lr=2e-3, scheduler__lr_warmup_iters=100)
    assert set(paths) >= {
        "optimizer.min_lr",
        "scheduler.lr_warmup_iters",
    }  # floor above peak; warmup too long


def test_inverse_square_root_rounds_like_megatron():
    # Megatron computes max_lr * warmup**0.5 / n**0.5; math.sqrt rounds this one 1 ulp lower.
    s = OptimizerParamScheduler(
        _adamw(),
        init_lr=0.0,
        max_lr=1.0,
        min_lr=0.1,
        lr_warmup_steps=50,
        lr_decay_steps=5000,
        lr_decay_style="inverse-square-root",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=0,
        wd_incr_style="constant",
    )
    s.step(2921)
    assert s.get_lr({}) == 0.13083357955509323
