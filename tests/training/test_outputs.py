"""Every output path of a run is checked at setup: one ConfigError lists all that cannot be written.

Tests run as root in CI, where permission bits do not stop writes: unwritable paths are made for
real in ways that hold for root too (a path under a regular file fails with ENOTDIR, a read-only
tmpfs mount with EROFS); the read-only mount is skipped where mounting is not permitted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from viaduct.config import ConfigError
from viaduct.testing import run_distributed, tiny_pretrain_config
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.outputs import output_problems
from viaduct.training.pretrain import pretrain

QUIET = ("train.eval_iters=0", "dataset.num_workers=0", "train.train_iters=1")


class _Started(Callback):
    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, ctx: CallbackContext) -> None:
        self.started = True


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write into, root included: a read-only tmpfs (or chmod when not root)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_all_unwritable_outputs_are_reported_at_once_before_training(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    started = _Started()
    cfg = tiny_pretrain_config(
        *QUIET,
        f"checkpoint.save={a_file / 'ckpt'}",  # under a regular file: ENOTDIR, for root too
        f"logger.tensorboard_dir={a_file}",  # an existing file, not a directory
        f"logger.save_config_filepath={a_dir}",  # a directory, not a file
    )
    with pytest.raises(ConfigError) as info:
        pretrain(cfg, callbacks=[started])
    assert not started.started
    err = info.value
    assert [p.path for p in err.problems] == [
        "checkpoint.save",
        "logger.tensorboard_dir",
        "logger.save_config_filepath",
    ]
    text = str(err)
    assert "3 output path(s) cannot be written" in text
    assert f"cannot be created: {a_file} is a file, not a directory" in text
    assert "exists and is not a directory" in text and "is a directory, not a file" in text
    assert all(p.fix for p in err.problems)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]  # nothing was written


def test_read_only_save_and_tensorboard_directories(tmp_path: Path, read_only_dir: Path) -> None:
    cfg = tiny_pretrain_config(
        *QUIET,
        f"checkpoint.save={read_only_dir / 'ckpt'}",  # to be created inside it
        f"logger.tensorboard_dir={read_only_dir}",  # itself
    )
    started = _Started()
    with pytest.raises(ConfigError) as info:
        pretrain(cfg, callbacks=[started])
    assert not started.started
    assert [p.path for p in info.value.problems] == ["checkpoint.save", "logger.tensorboard_dir"]
    assert f"{read_only_dir} is not writable" in str(info.value)
    assert not (read_only_dir / "ckpt").exists()


def test_writable_outputs_pass_and_the_check_creates_nothing(tmp_path: Path) -> None:
    cfg = tiny_pretrain_config(
        *QUIET,
        f"checkpoint.save={tmp_path / 'a' / 'b' / 'ckpt'}",
        f"logger.tensorboard_dir={tmp_path / 'tb'}",
        f"logger.save_config_filepath={tmp_path / 'cfg' / 'run.yaml'}",
        "logger.wandb_project=p",
        f"logger.wandb_save_dir={tmp_path / 'a_file' / 'wandb'}",
    )
    (tmp_path / "a_file").write_text("x")
    problems = output_problems(cfg, rank=0, world_size=1)
    assert [p.path for p in problems] == ["logger.wandb_save_dir"]  # W&B on: its directory counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # probes leave nothing behind
    cfg.logger.wandb_project = None
    assert output_problems(cfg, rank=0, world_size=1) == []  # W&B off: never written


def test_outputs_are_checked_on_the_ranks_that_write_them(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    cfg = tiny_pretrain_config(
        *QUIET,
        f"logger.tensorboard_dir={tmp_path / 'f' / 'tb'}",  # the last rank writes TensorBoard
        f"logger.save_config_filepath={tmp_path / 'f' / 'c.yaml'}",  # rank 0 writes the config
    )
    assert [p.path for p in output_problems(cfg, rank=0, world_size=2)] == ["logger.save_config_filepath"]
    assert [p.path for p in output_problems(cfg, rank=1, world_size=2)] == ["logger.tensorboard_dir"]


def _setup_fails(rank: int, world_size: int, root: str, case: str) -> None:
    base = Path(root)
    if case == "tb":  # only the last rank writes TensorBoard: rank 0 must stop too
        override = f"logger.tensorboard_dir={base / 'f' / 'tb'}"
    else:  # the test process holds the save directory's lock: both ranks stop at setup
        override = f"checkpoint.save={base / 'locked'}"
    cfg = tiny_pretrain_config(*QUIET, "dist.distributed_timeout_minutes=1", override)
    try:
        pretrain(cfg)
        result = "no error"
    except ConfigError as exc:
        result = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    (base / f"{case}-rank{rank}.txt").write_text(result)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_output_only_the_last_rank_writes_stops_every_rank(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    run_distributed(_setup_fails, 2, str(tmp_path), "tb", timeout=240)  # no rank left waiting
    rank0, rank1 = ((tmp_path / f"tb-rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith("ConfigError") and "failed on another rank" in rank0
    assert "logger.tensorboard_dir: cannot be created" in rank1 and "is a file" in rank1


@pytest.mark.slow
@pytest.mark.distributed
def test_a_locked_save_directory_stops_every_rank(tmp_path: Path) -> None:
    from viaduct.training.checkpoint.lock import SaveDirLock

    with SaveDirLock(tmp_path / "locked"):
        run_distributed(_setup_fails, 2, str(tmp_path), "lock", timeout=240)
    rank0, rank1 = ((tmp_path / f"lock-rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith("SaveDirLockedError") and f"pid {os.getpid()} on host" in rank0
    assert rank1.startswith("ConfigError") and "checkpoint.save: locking the checkpoint directory" in rank1
