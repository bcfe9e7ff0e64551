"""Checkpoints across data-parallel sizes, with real gloo processes (viaduct.testing.run_distributed).

Each phase loads what the previous one saved, checks it equals what that phase held (weights, Adam
state, schedule, step, consumed samples), trains on and saves. The training step is data parallel
for real: every step draws one global batch, each rank takes its share and gradients are averaged,
so the losses do not depend on the world size and a resharded run tracks a straight one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from viaduct.distributed.init import DistributedContext
from viaduct.models import GPTModelProvider
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.testing import assert_identical, run_distributed, tiny_pretrain_config
from viaduct.training.checkpointing import Checkpointer
from viaduct.training.config import CheckpointConfig, ConfigContainer, SchedulerConfig
from viaduct.training.optim import build_optimizer
from viaduct.training.scheduler import build_scheduler
from viaduct.training.state import TrainState

VOCAB, SEQ, ROWS = 64, 16, 4  # ROWS sequences per global batch, split over the ranks
pytestmark = pytest.mark.distributed


def _cfg(world: int, root: str) -> ConfigContainer:
    cfg = tiny_gpt_pretrain_config()
    cfg.model = GPTModelProvider(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=VOCAB,
        seq_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    cfg.train.train_iters = 20
    cfg.scheduler = SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=2)
    cfg.checkpoint = CheckpointConfig(save=root, load=root, fully_parallel_load=world > 1)
    return cfg.validate(world_size=world)


def _snapshot(model: Any, optimizer: Any, scheduler: Any, ts: TrainState) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": ts.step,
        "consumed": ts.consumed_train_samples,
    }


def _phase(rank: int, world: int, root: str, steps: int, expect: int | None) -> list[float]:
    """Load (expecting step `expect`), check against the saved reference, train `steps` and save."""
    if world > 1:  # run_distributed set the torchrun environment
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD if world > 1 else None
        ctx = DistributedContext(rank=rank, world_size=world, backend="gloo", host_group=group)
        cfg = _cfg(world, os.path.join(root, "ckpt"))
        # A fresh start has replicas (as after DDP's broadcast); a resume starts from different weights
        # on every rank, so only the checkpoint can make them agree.
        torch.manual_seed(100 + (rank if expect is not None else 0))
        model = cfg.model.provide()
        optimizer = build_optimizer(cfg.optimizer, model)
        scheduler = build_scheduler(cfg, optimizer)
        ts = TrainState()
        ckpt = Checkpointer(cfg, ctx)
        assert ckpt.load(model=model, optimizer=optimizer, scheduler=scheduler, train_state=ts) == expect
        if expect is not None:
            ref = torch.load(os.path.join(root, f"ref_{expect}.pt"), weights_only=True)
            assert_identical(ref, _snapshot(model, optimizer, scheduler, ts))
        losses = []
        share = ROWS // world
        for _ in range(steps):
            g = torch.Generator().manual_seed(ts.step)
            x = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)[rank * share : (rank + 1) * share]
            optimizer.zero_grad()
            loss = model(x, labels=torch.roll(x, -1, 1)).float().mean()
            loss.backward()
            if world > 1:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            optimizer.step()
            scheduler.step(ROWS)
            ts.step += 1
            ts.consumed_train_samples += ROWS
            losses.append(loss.item())
        ckpt.save(ts.step, model=model, optimizer=optimizer, scheduler=scheduler, train_state=ts)
        if rank == 0:
            torch.save(_snapshot(model, optimizer, scheduler, ts), os.path.join(root, f"ref_{ts.step}.pt"))
        return losses
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(world: int, root: Path, steps: int, expect: int | None) -> list[float]:
    if world == 1:
        return _phase(0, 1, str(root), steps, expect)
    return run_distributed(_phase, world, str(root), steps, expect, timeout=90, reuse=True)


@pytest.mark.slow
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (2, 1, 2)], ids=lambda w: "->".join(map(str, w)))
def test_resharded_resume_restores_everything_and_tracks_a_straight_run(
    tmp_path: Path, worlds: tuple[int, ...]
) -> None:
    losses: list[float] = []
    step = None
    for world in worlds:
        losses += _run(world, tmp_path, 2, step)
        step = len(losses)  # one step per loss, all saved
    assert step == 2 * len(worlds)
    ts = torch.load(tmp_path / "ckpt" / f"iter_{step:07d}" / "train_state.pt", weights_only=True)
    assert int(ts["step"]) == step and int(ts["consumed_train_samples"]) == step * ROWS

    straight = _run(1, tmp_path / "straight", len(losses), None)
    # Same data, same math; only the order of the gradient all-reduce differs.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight), rtol=1e-5, atol=1e-6)


def _pretrain_losses(rank: int, world: int, save: str, phases: list[list[str]]) -> list[list[float]]:
    """Run `pretrain` once per override list (each creates and destroys its process group)."""
    from viaduct.training.callbacks import Callback
    from viaduct.training.pretrain import pretrain

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_step_end(self, ctx: Any) -> None:
            self.values.append(float(ctx.metrics["losses"]["lm loss"]))

    out = []
    for overrides in phases:
        rec = Losses()
        pretrain(tiny_pretrain_config(*overrides), callbacks=[rec])
        out.append(rec.values)
    return out


@pytest.mark.slow
def test_two_rank_resume_is_bitwise(tmp_path: Path) -> None:
    """DP 2, fp32, Adam: 4 steps straight equal 2 steps, a restart from the checkpoint, and 2 more."""
    save = tmp_path / "ckpt"
    common = ["train.train_iters=4", "train.eval_iters=0", "optimizer.optimizer=adam"]
    straight, first, second = run_distributed(
        _pretrain_losses,
        2,
        str(save),
        [
            common,
            [*common, "train.exit_interval=2", f"checkpoint.save={save}"],
            [*common, f"checkpoint.save={save}", f"checkpoint.load={save}"],
        ],
        timeout=120,
        reuse=True,
    )
    assert len(straight) == 4 and len(first) == 2 and len(second) == 2
    assert first + second == straight
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
