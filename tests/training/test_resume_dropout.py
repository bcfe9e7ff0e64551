"""Bitwise resume with dropout: nothing may draw from the global generators between the RNG state a
run starts from (seeded, or loaded from a checkpoint) and its first step.

Dropout masks come from torch's global generator, so a draw anywhere in setup (a DataLoader iterator
taking its workers' base seed, a callback) would shift every mask after a resume.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from viaduct.data.loaders import build_train_valid_test_data_iterators, get_sample_counts
from viaduct.data.tokenizers import build_tokenizer
from viaduct.testing import assert_identical, tiny_pretrain_config
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.pretrain import pretrain

N = 3  # steps before the restart; the straight run takes 2N


class Record(Callback):
    """Each step's loss (as the device left it) and the final weights."""

    def __init__(self, draw_at_start: bool = False) -> None:
        self.draw_at_start = draw_at_start
        self.losses: list[torch.Tensor] = []
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, ctx: CallbackContext) -> None:
        if self.draw_at_start:  # user code that draws random numbers before the first step
            torch.rand(16)
            random.random()

    def on_train_step_end(self, ctx: CallbackContext) -> None:
        self.losses.append(ctx.metrics["losses"]["lm loss"].detach().clone())

    def on_train_end(self, ctx: CallbackContext) -> None:
        self.weights = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}


def _run(*overrides: str, draw_at_start: bool = False) -> Record:
    rec = Record(draw_at_start)
    pretrain(tiny_pretrain_config(*overrides), callbacks=[rec])
    return rec


def _straight_and_resumed(tmp_path: Path, *common: str, draw_at_start: bool = False) -> None:
    straight = _run(*common, draw_at_start=draw_at_start)
    save = tmp_path / "ckpt"
    first = _run(*common, f"train.exit_interval={N}", f"checkpoint.save={save}", draw_at_start=draw_at_start)
    second = _run(*common, f"checkpoint.save={save}", f"checkpoint.load={save}", draw_at_start=draw_at_start)
    assert len(first.losses) == N and len(second.losses) == N
    assert_identical(first.losses + second.losses, straight.losses, "losses")
    assert_identical(second.weights, straight.weights, "weights")


def _dropout_config(num_workers: int) -> tuple[str, ...]:
    return (
        f"train.train_iters={2 * N}",
        "train.eval_interval=2",  # evaluations before and after the restart use the validation loader
        "train.eval_iters=1",
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
        f"dataset.num_workers={num_workers}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_dropout_is_bitwise(tmp_path: Path, num_workers: int) -> None:
    """2N steps straight equal N steps, a restart from the checkpoint and N more: losses and weights."""
    _straight_and_resumed(tmp_path, *_dropout_config(num_workers))


@pytest.mark.slow
def test_random_draws_before_the_first_step_do_not_shift_a_resumed_run(tmp_path: Path) -> None:
    _straight_and_resumed(tmp_path, *_dropout_config(0), draw_at_start=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_building_the_data_iterators_leaves_the_global_generator_alone(num_workers: int) -> None:
    cfg = tiny_pretrain_config(f"dataset.num_workers={num_workers}").validate()
    tokenizer = build_tokenizer(cfg.tokenizer)
    train_n, valid_n, test_n = get_sample_counts(cfg)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    iterators = build_train_valid_test_data_iterators(
        cfg,
        tokenizer,
        dp_rank=0,
        dp_size=1,
        consumed_train_samples=16,
        consumed_valid_samples=0,
        train_samples=train_n,
        valid_samples=valid_n,
        test_samples=test_n,
    )
    assert all(it is not None for it in iterators)
    next(iterators[0])
    assert torch.equal(torch.get_rng_state(), before)
    del iterators  # shuts the workers down
