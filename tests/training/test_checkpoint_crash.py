"""A process SIGKILLed at each moment of a checkpoint save, then resumed in another process.

The child (a script written into tmp_path) trains a tiny GPT, saves a complete checkpoint at step 2,
trains on and dies inside the save of step 4: the environment variable ``CRASH_AT`` says where. It
patches only its own process (storage write, ``os.rename``, ``os.replace``, the tracker's temporary
file, ``shutil.rmtree`` of retention) so the kill lands exactly there. This process then resumes with
``checkpoint.load``: it must get the last checkpoint the tracker vouches for, bit for bit, train on
with finite losses, and save again over whatever the crash left behind.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from viaduct.testing import assert_identical

# The child script. The parent imports the same file, so both sides build the same model and config.
CHILD = r'''
"""Train a tiny GPT, save at step 2, then die (SIGKILL) inside the save of step 4 where CRASH_AT says."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch

import viaduct.training.checkpoint.layout as L
import viaduct.training.checkpoint.storage as S
from viaduct.distributed.init import DistributedContext
from viaduct.models import GPTModelProvider
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.checkpointing import Checkpointer
from viaduct.training.config import CheckpointConfig, SchedulerConfig
from viaduct.training.optim import build_optimizer
from viaduct.training.scheduler import build_scheduler
from viaduct.training.state import TrainState

VOCAB, SEQ, GBS = 64, 16, 16
CRASH_STEP = int(os.environ.get("CRASH_STEP", "4"))  # the save that dies


def make_cfg(**ckpt: Any) -> Any:
    cfg = tiny_gpt_pretrain_config()
    cfg.model = GPTModelProvider(
        num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    cfg.train.train_iters = 20
    cfg.scheduler = SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=2)
    cfg.checkpoint = CheckpointConfig(**ckpt)
    return cfg.validate(world_size=1)


class Run:
    def __init__(self, cfg: Any, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = cfg.model.provide()
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.train_state = TrainState()

    def objects(self) -> dict[str, Any]:
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                    train_state=self.train_state)

    def step(self, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            g = torch.Generator().manual_seed(self.train_state.step)
            x = torch.randint(0, VOCAB, (2, SEQ), generator=g)
            self.optimizer.zero_grad()
            loss = self.model(x, labels=torch.roll(x, -1, 1)).float().mean()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step(GBS)
            self.train_state.step += 1
            self.train_state.consumed_train_samples += GBS
            losses.append(loss.item())
        return losses

    def snapshot(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.train_state.step,
                "consumed": self.train_state.consumed_train_samples}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Patch this process so that it kills itself at `point` of the next save."""
    if point == "tensors_written":  # shards on disk, rank-0 files not yet
        for cls in (S.DcpStorage, S.TorchStorage):
            cls.write = lambda self, d, t, write=cls.write: (write(self, d, t), die())
    elif point == "metadata_written":  # every file in the .tmp directory, not yet renamed
        write_text = L.write_text
        def wt(path: Path, text: str) -> None:
            write_text(path, text)
            if path.name == L.METADATA:
                die()
        L.write_text = wt
    elif point in ("before_rename", "after_rename"):
        rename = os.rename
        def rn(src: Any, dst: Any) -> None:
            ours = Path(src).name == L.iter_name(CRASH_STEP) + ".tmp"  # not DCP's own .metadata.tmp
            if ours and point == "before_rename":
                die()
            rename(src, dst)
            if ours:
                die()
        os.rename = rn
    elif point == "tracker_tmp_torn":  # the tracker's temporary file half written
        def torn(path: Path, text: str) -> None:
            path.write_text(text[:0])
            die()
        write_text = L.write_text
        L.write_text = lambda p, t: torn(p, t) if p.name.startswith(f".{L.TRACKER}") else write_text(p, t)
    elif point in ("before_tracker_replace", "after_tracker"):
        replace = os.replace
        def rp(src: Any, dst: Any) -> None:
            if Path(dst).name == L.TRACKER and point == "before_tracker_replace":
                die()
            replace(src, dst)
            if Path(dst).name == L.TRACKER:
                die()
        os.replace = rp
    elif point == "train_state_tracker_torn":  # the text tracker says 4; Bridge's copy half written
        save_file = L.save_file
        def torn_pt(obj: Any, path: Path) -> int:
            if path.name.startswith(f".{L.LATEST_TRAIN_STATE}"):
                path.write_bytes(b"PK\x03")
                die()
            return save_file(obj, path)
        L.save_file = torn_pt
    elif point == "during_retention":  # iter_2 renamed to .deleting, not yet removed
        rmtree = shutil.rmtree
        def rt(path: Any, *a: Any, **k: Any) -> None:
            if str(path).endswith(".deleting"):
                die()
            rmtree(path, *a, **k)
        shutil.rmtree = rt
    else:
        raise SystemExit(f"unknown CRASH_AT {point!r}")


def main(root: str, refs: str, point: str, fmt: str) -> None:
    cfg = make_cfg(save=root, load=root, ckpt_format=fmt, most_recent_k=1)
    run = Run(cfg)
    ckpt = Checkpointer(cfg, DistributedContext())
    for _ in range(2):
        run.step(2)
        torch.save(run.snapshot(), os.path.join(refs, f"ref_{run.train_state.step}.pt"))
        if run.train_state.step == CRASH_STEP:
            arm(point)
        ckpt.save(run.train_state.step, **run.objects())
    ckpt.finalize()  # as a run's end does: waits for the background removal of old checkpoints
    sys.exit(3)  # not reached: the save of step 4 (or its background removal) kills the process


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], os.environ["CRASH_AT"], os.environ.get("CKPT_FORMAT", "torch_dist"))
'''

# Where the kill lands -> the step a resume must come back at (the tracker still names 2 until replaced).
POINTS = {
    "tensors_written": 2,
    "metadata_written": 2,
    "before_rename": 2,
    "after_rename": 2,
    "tracker_tmp_torn": 2,
    "before_tracker_replace": 2,
    "after_tracker": 4,  # latest_train_state.pt still names 2: the newer tracker wins
    "train_state_tracker_torn": 4,
    "during_retention": 4,
}


def _child(tmp_path: Path) -> tuple[Path, ModuleType]:
    script = tmp_path / "crash_child.py"
    script.write_text(CHILD)
    spec = importlib.util.spec_from_file_location("crash_child", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the parent's copy: same model, config and training step
    return script, module


def _crash(tmp_path: Path, script: Path, point: str, fmt: str, step: int = 4) -> Path:
    root = tmp_path / "ckpt"
    env = {"CRASH_AT": point, "CKPT_FORMAT": fmt, "CRASH_STEP": str(step), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    return root


def _leftovers(root: Path) -> list[str]:
    """Temporary directories of a save, and the tracker's temporary file, left by a crash."""
    return sorted(
        p.name for p in root.iterdir() if p.suffix in (".tmp", ".deleting", ".replaced") or ".tmp-" in p.name
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "fmt"),
    [(p, "torch_dist") for p in POINTS] + [("tensors_written", "torch"), ("after_rename", "torch")],
)
def test_kill_during_save_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path, point: str, fmt: str
) -> None:
    script, child = _child(tmp_path)
    root = _crash(tmp_path, script, point, fmt)
    expected = POINTS[point]
    tracker = root / "latest_checkpointed_iteration.txt"
    assert int(tracker.read_text()) == expected  # the tracker is never torn, only old or new

    # A fresh process (this one) resumes with most_recent_k=1 over whatever the crash left.
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.checkpointing import Checkpointer

    cfg = child.make_cfg(save=str(root), load=str(root), ckpt_format=fmt, most_recent_k=1)
    run = child.Run(cfg, seed=7)
    ckpt = Checkpointer(cfg, DistributedContext())
    assert ckpt.load(**run.objects()) == expected
    ref = torch.load(tmp_path / f"ref_{expected}.pt", weights_only=True)
    assert_identical(ref, run.snapshot())
    loaded = root / f"iter_{expected:07d}"

    # Train on past the crashed step and save at 3 (or 5), then at 4 (or 6): the first save clears
    # the crash's leftovers; the second one, at a step a dead run may have left complete, replaces it.
    for _ in range(2):
        losses = run.step(1)
        assert all(math.isfinite(x) for x in losses)
        ckpt.save(run.train_state.step, **run.objects())
        ckpt.wait_for_pending_save()  # old checkpoints are removed in the background
        assert _leftovers(root) == []
        assert loaded.is_dir()  # retention spares the checkpoint this run started from
    last = run.train_state.step
    assert last == expected + 2 and run.train_state.consumed_train_samples == last * child.GBS
    assert int(tracker.read_text()) == last
    bridge_tracker = torch.load(root / "latest_train_state.pt", weights_only=True)
    assert int(bridge_tracker["step"]) == last
    kept = sorted(p.name for p in root.glob("iter_*"))
    assert f"iter_{last:07d}" in kept and loaded.name in kept and len(kept) <= 3

    again = child.Run(cfg, seed=8)
    assert Checkpointer(cfg, DistributedContext()).load(**again.objects()) == last
    assert_identical(run.snapshot(), again.snapshot())


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_completes_leaves_nothing_to_load(tmp_path: Path) -> None:
    """A run killed inside its very first save: a resume starts fresh (None), and the next save works."""
    script, child = _child(tmp_path)
    root = _crash(tmp_path, script, "before_rename", "torch_dist", step=2)
    assert [p.name for p in root.iterdir()] == ["iter_0000002.tmp"]
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.checkpointing import Checkpointer

    cfg = child.make_cfg(save=str(root), load=str(root), most_recent_k=1)
    run = child.Run(cfg)
    ckpt = Checkpointer(cfg, DistributedContext())
    assert ckpt.load(**run.objects()) is None
    run.step(2)
    ckpt.save(2, **run.objects())
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
        "latest_train_state.pt",
    ]
