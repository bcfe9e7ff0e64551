"""Megatron-Core as an oracle for the learning-rate / weight-decay schedule and the micro-batch
calculator with batch-size ramp-up: the same value at every sample count, bit for bit."""

from __future__ import annotations

import itertools
import logging
import warnings

import pytest

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": irrelevant here
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from megatron.core.num_microbatches_calculator import _build_num_microbatches_calculator
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as McoreScheduler

from viaduct.training.microbatches import MicroBatchCalculator
from viaduct.training.scheduler import OptimizerParamScheduler

logging.getLogger("megatron").setLevel(logging.WARNING)


class Groups:
    """An optimizer as far as a scheduler sees one: its parameter groups."""

    def __init__(self, *groups: dict) -> None:
        self.param_groups = [dict(g) for g in groups]


SCHEDULES = [
    dict(lr_decay_style="constant"),
    dict(lr_decay_style="linear"),
    dict(lr_decay_style="cosine"),
    dict(lr_decay_style="inverse-square-root"),
    dict(lr_decay_style="cosine", lr_warmup_steps=0),
    dict(lr_decay_style="inverse-square-root", lr_warmup_steps=0),
    *(
        dict(lr_decay_style="WSD", wsd_decay_steps=wsd, lr_wsd_decay_style=style)
        for style, wsd in itertools.product(("exponential", "linear", "cosine", "minus_sqrt"), (130, 777))
    ),
]
WEIGHT_DECAYS = [
    dict(start_wd=0.1, end_wd=0.1, wd_incr_steps=0, wd_incr_style="constant"),
    dict(start_wd=0.0, end_wd=0.1, wd_incr_steps=1000, wd_incr_style="linear"),
    dict(start_wd=0.01, end_wd=0.3, wd_incr_steps=640, wd_incr_style="cosine"),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("wd", WEIGHT_DECAYS, ids=lambda w: w["wd_incr_style"])
def test_every_sample_count_gets_megatrons_lr_and_weight_decay(schedule, wd):
    # Lengths in samples (warmup included), stepped by uneven increments as a ramp-up would.
    kw = dict(init_lr=1e-5, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=96, lr_decay_steps=1000)
    kw.update(schedule)
    kw.update(wd)
    groups = ({}, {"wd_mult": 0.0}, {"max_lr": 1e-3, "min_lr": 1e-4, "wd_mult": 0.5})
    ours = OptimizerParamScheduler(Groups(*groups), **kw)
    theirs = McoreScheduler(Groups(*groups), use_checkpoint_opt_param_scheduler=False, **kw)
    increments = [0] + [1, 3, 8, 16, 32, 5] * 40  # crosses warmup, the WSD start, decay end and beyond
    for increment in increments:
        ours.step(increment)
        theirs.step(increment)
        assert ours.num_steps == theirs.num_steps
        for a, b in zip(ours.optimizer.param_groups, theirs.optimizer.param_groups):
            assert a["lr"] == b["lr"], (ours.num_steps, a, b)
            assert a["weight_decay"] == b["weight_decay"], (ours.num_steps, a, b)
    assert ours.num_steps > kw["lr_decay_steps"]


def test_every_step_of_a_long_schedule_matches():
    kw = dict(init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=50, lr_decay_steps=5000)
    wd = dict(start_wd=0.0, end_wd=0.1, wd_incr_steps=5000, wd_incr_style="cosine")
    for style in ("linear", "cosine", "inverse-square-root"):
        ours = OptimizerParamScheduler(Groups({}), lr_decay_style=style, **kw, **wd)
        theirs = McoreScheduler(Groups({}), lr_decay_style=style, **kw, **wd)
        for _ in range(5200):
            ours.step(1)
            theirs.step(1)
            assert ours.optimizer.param_groups[0] == theirs.optimizer.param_groups[0], (style, ours.num_steps)


RAMPUPS = [
    dict(global_batch_size=64, micro_batch_size=2, data_parallel_size=2, rampup_batch_size=[8, 8, 1000]),
    dict(global_batch_size=96, micro_batch_size=4, data_parallel_size=1, rampup_batch_size=[16, 16, 777]),
    dict(global_batch_size=30, micro_batch_size=1, data_parallel_size=3, rampup_batch_size=[6, 3, 500]),
    dict(global_batch_size=32, micro_batch_size=2, data_parallel_size=2, rampup_batch_size=None),
    # decrease_batch_size_if_needed: batches that do not divide are rounded down.
    dict(
        global_batch_size=50,
        micro_batch_size=2,
        data_parallel_size=3,
        rampup_batch_size=[14, 4, 300],
        decrease_batch_size_if_needed=True,
    ),
]


@pytest.mark.parametrize("cfg", RAMPUPS, ids=lambda c: str(c["rampup_batch_size"]))
def test_the_micro_batch_calculator_follows_megatrons_ramp_up(cfg):
    cfg = dict(cfg)
    cfg.setdefault("decrease_batch_size_if_needed", False)
    ours = MicroBatchCalculator(**cfg)
    theirs = _build_num_microbatches_calculator(rank=1, **cfg)
    consumed = 0
    for _ in range(400):  # train as the loop does: each step consumes the current batch
        ours.update(consumed)
        theirs.update(consumed, consistency_check=True)
        assert ours.num_microbatches == theirs.get(), consumed
        assert ours.current_global_batch_size == theirs.get_current_running_global_batch_size(), consumed
        consumed += ours.current_global_batch_size
    for consumed in range(0, 1200):  # and at every sample count
        ours.update(consumed)
        theirs.update(consumed, consistency_check=True)
        assert ours.num_microbatches == theirs.get(), consumed
