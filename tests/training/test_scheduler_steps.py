"""`compute_scheduler_steps`: the scheduler's sample counts against hand-computed numbers.

Iteration mode multiplies iterations by the global batch size; sample mode takes samples as they
are. Decay defaults to max_steps, then to the run length; WSD annealing defaults to the whole decay;
a warmup that does not end before the decay is reported, never clamped.
"""

import pytest

from viaduct.config import ConfigError
from viaduct.training.config.scheduler import SchedulerConfig, compute_scheduler_steps


def steps(s: SchedulerConfig) -> tuple:
    return s.lr_decay_steps, s.lr_warmup_steps, s.wd_incr_steps, s.wsd_decay_steps


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # iteration mode: train_iters=1000, global batch 8 -> every count is iterations × 8 samples
        ({"lr_warmup_iters": 100}, (8000, 800, 8000, None)),
        ({"lr_decay_iters": 800, "lr_warmup_iters": 50}, (6400, 400, 8000, None)),
        ({"lr_warmup_fraction": 0.1}, (8000, 800, 8000, None)),
        ({"lr_warmup_fraction": 0.0125, "lr_decay_iters": 500}, (4000, 50, 8000, None)),
        ({"max_steps": 2000, "lr_warmup_iters": 10}, (16000, 80, 16000, None)),
        ({"max_steps": 2000, "lr_decay_iters": 1500}, (12000, 0, 16000, None)),
        ({"lr_decay_style": "WSD"}, (8000, 0, 8000, 8000)),
        ({"lr_decay_style": "WSD", "lr_wsd_decay_iters": 100}, (8000, 0, 8000, 800)),
        ({"lr_decay_style": "WSD", "max_steps": 1200, "lr_warmup_fraction": 0.5}, (9600, 4800, 9600, 9600)),
    ],
)
def test_scheduler_steps_iteration_mode(kw, expected):
    s = SchedulerConfig(**kw)
    s.finalize()
    compute_scheduler_steps(s, train_iters=1000, train_samples=None, global_batch_size=8)
    assert steps(s) == expected
    assert s.source_of("lr_decay_steps").startswith("derived")


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # sample mode: train_samples=10000; counts are samples, the global batch does not enter
        ({"lr_warmup_samples": 500}, (10000, 500, 10000, None)),
        ({"lr_decay_samples": 8000}, (8000, 0, 10000, None)),
        ({"lr_warmup_fraction": 0.05}, (10000, 500, 10000, None)),
        ({"lr_decay_style": "WSD", "lr_wsd_decay_samples": 2000}, (10000, 0, 10000, 2000)),
        ({"lr_decay_style": "WSD", "lr_decay_samples": 6000}, (6000, 0, 10000, 6000)),
    ],
)
def test_scheduler_steps_sample_mode(kw, expected):
    s = SchedulerConfig(**kw)
    compute_scheduler_steps(s, train_iters=None, train_samples=10000, global_batch_size=32)
    assert steps(s) == expected


def _steps_error(s, **run) -> list:
    with pytest.raises(ConfigError) as info:
        compute_scheduler_steps(
            s, **{"train_iters": None, "train_samples": None, "global_batch_size": 8, **run}
        )
    return info.value.problems


@pytest.mark.parametrize(
    ("kw", "run", "path", "words"),
    [
        ({"lr_warmup_iters": 10}, {"train_samples": 100}, "scheduler.lr_warmup_iters", ["lr_warmup_samples"]),
        ({"max_steps": 10}, {"train_samples": 100}, "scheduler.max_steps", ["iteration-based"]),
        ({"lr_decay_samples": 10}, {"train_iters": 100}, "scheduler.lr_decay_samples", ["lr_decay_iters"]),
        ({"max_steps": 50}, {"train_iters": 100}, "scheduler.max_steps", ["shorter", ">= 100"]),
        ({}, {}, "train.train_iters", ["train.train_iters"]),
        ({}, {"train_iters": 10, "global_batch_size": None}, "train.global_batch_size", ["train.global"]),
        ({}, {"train_iters": 0}, "train.train_iters", ["0 samples", "> 0"]),
    ],
)
def test_scheduler_steps_rules(kw, run, path, words):
    found = [p for p in _steps_error(SchedulerConfig(**kw), **run) if p.path == path]
    assert found, _steps_error(SchedulerConfig(**kw), **run)
    text = f"{found[0].message} {found[0].fix}"
    assert all(w in text for w in words), text


def test_warmup_not_shorter_than_decay_is_reported_not_clamped():
    s = SchedulerConfig(lr_warmup_iters=100)
    (p,) = _steps_error(s, train_iters=50, global_batch_size=4)
    assert p.path == "scheduler.lr_warmup_iters" and p.value == 100
    for number in ("100 -> 400 samples", "train.train_iters = 50 -> 200 samples"):
        assert number in p.message
    assert "below 50 iterations" in p.fix and "lr_warmup_fraction" in p.fix
    assert s.lr_warmup_steps is None and s.lr_decay_steps is None
    (p,) = _steps_error(SchedulerConfig(lr_warmup_samples=300), train_samples=300)
    assert p.path == "scheduler.lr_warmup_samples" and "below 300 samples" in p.fix
    (p,) = _steps_error(SchedulerConfig(lr_warmup_fraction=1.0), train_iters=10)  # finalize() not run
    assert p.path == "scheduler.lr_warmup_fraction" and "below 1" in p.fix


def test_scheduler_steps_recomputed_after_edit():
    s = SchedulerConfig(lr_warmup_iters=10)
    for _ in range(2):
        compute_scheduler_steps(s, train_iters=100, train_samples=None, global_batch_size=4)
        assert steps(s) == (400, 40, 400, None)
    s.lr_decay_style = "WSD"
    compute_scheduler_steps(s, train_iters=200, train_samples=None, global_batch_size=4)
    assert steps(s) == (800, 40, 800, 800)
    s.lr_decay_style = "cosine"
    compute_scheduler_steps(s, train_iters=200, train_samples=None, global_batch_size=4)
    assert s.wsd_decay_steps is None
