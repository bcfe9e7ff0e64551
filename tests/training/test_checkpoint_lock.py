"""Two runs, one checkpoint directory: the second stops at setup, naming the first; a save never
commits a ``.tmp`` directory that another writer took over.

The runs are real processes: a child `pretrain()` holds the lock while the test's own `pretrain()`
tries to start; a child killed with SIGKILL leaves no stale lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from viaduct.testing import tiny_pretrain_config
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.checkpoint import layout as L
from viaduct.training.checkpoint.lock import SaveDirLock, SaveDirLockedError
from viaduct.training.checkpoint.storage import DcpStorage
from viaduct.training.checkpointing import Checkpointer, CheckpointSaveError
from viaduct.training.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpointing import Run, ctx1, make_cfg

QUIET = ("train.eval_iters=0", "dataset.num_workers=0")

# A run that pauses inside training (holding the lock) until the test lets it go on.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from viaduct.testing import tiny_pretrain_config
    from viaduct.training.callbacks import Callback
    from viaduct.training.pretrain import pretrain

    save, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    class Pause(Callback):
        def on_train_start(self, ctx):
            ready.write_text("ready")
            deadline = time.time() + 120
            while not go.exists() and time.time() < deadline:
                time.sleep(0.05)

    pretrain(
        tiny_pretrain_config(
            "train.train_iters=2", "train.eval_iters=0", "dataset.num_workers=0", f"checkpoint.save={save}"
        ),
        callbacks=[Pause()],
    )
    """
)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the child run ended early ({proc.returncode}):\n{out}")
        assert time.time() < deadline, "the child run did not start in time"
        time.sleep(0.05)


class _Started(Callback):
    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, ctx: CallbackContext) -> None:
        self.started = True


@pytest.mark.slow
def test_a_second_run_on_the_same_save_directory_stops_at_setup_naming_the_holder(tmp_path: Path) -> None:
    save, ready, go = tmp_path / "ckpt", tmp_path / "ready", tmp_path / "go"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(save), str(ready), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(ready, child)
        holder = json.loads((save / ".lock").read_text())
        assert holder["pid"] == child.pid

        started = _Started()
        cfg = tiny_pretrain_config("train.train_iters=2", *QUIET, f"checkpoint.save={save}")
        t0 = time.time()
        with pytest.raises(SaveDirLockedError) as info:
            pretrain(cfg, callbacks=[started])
        assert time.time() - t0 < 30  # at once, not after a timeout
        assert not started.started  # before training
        text = str(info.value)
        assert isinstance(info.value, ValueError) and "checkpoint.save" in text
        assert f"pid {child.pid} on host {holder['host']}" in text and str(save / ".lock") in text
        assert not (save / "iter_0000002.tmp").exists()

        go.write_text("go")
        out, _ = child.communicate(timeout=180)
        assert child.returncode == 0, out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The first run saved undisturbed; its lock is released, so a later run starts.
    assert L.read_tracker(save) == 2 and L.is_checkpoint_dir(save / "iter_0000002")
    assert (save / ".lock").read_text() == ""  # the description is cleared on release
    pretrain(
        tiny_pretrain_config(
            "train.train_iters=3", *QUIET, f"checkpoint.save={save}", f"checkpoint.load={save}"
        )
    )
    assert L.read_tracker(save) == 3


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path\n"
        "from viaduct.training.checkpoint.lock import SaveDirLock\n"
        "SaveDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        lock = SaveDirLock(tmp_path)
        with pytest.raises(SaveDirLockedError, match=f"pid {child.pid} on host"):
            lock.acquire()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with SaveDirLock(tmp_path) as lock:  # the kernel released the dead process's lock
        assert lock.held
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


class _TakenOver(DcpStorage):
    """Real DCP storage; once this run has written its tensors, another run saving the same step
    into the same directory takes the .tmp directory over (as it does when no lock keeps it out)."""

    def write(self, directory: Path, tensors: dict) -> None:
        super().write(directory, tensors)
        L.remove_dir(directory)
        directory.mkdir()
        L.write_marker(directory, "another run's token")
        super().write(directory, tensors)


@pytest.mark.slow
def test_a_save_never_commits_a_tmp_directory_another_writer_took_over(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg).step(1)
    ckpt = Checkpointer(cfg, ctx1())
    run.save(ckpt)
    run.step(1)
    ckpt._storages["torch_dist"] = _TakenOver(rank=0, world_size=1)
    with pytest.raises(CheckpointSaveError, match="replaced by another process") as info:
        run.save(ckpt)
    assert isinstance(info.value, ValueError) and "iteration 2" in str(info.value)
    assert not (tmp_path / "iter_0000002").exists()  # never given the final name
    assert L.read_tracker(tmp_path) == 1


def test_a_save_never_commits_an_incomplete_tmp_directory(tmp_path: Path) -> None:
    class NoIndex(DcpStorage):
        def write(self, directory: Path, tensors: dict) -> None:
            super().write(directory, tensors)
            (directory / L.DCP_METADATA).unlink()  # as when another writer's files replace ours

    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg).step(1)
    ckpt = Checkpointer(cfg, ctx1())
    ckpt._storages["torch_dist"] = NoIndex(rank=0, world_size=1)
    with pytest.raises(CheckpointSaveError, match=r"lacks \['.metadata'\]"):
        run.save(ckpt)
    assert not (tmp_path / "iter_0000001").exists() and L.read_tracker(tmp_path) is None
