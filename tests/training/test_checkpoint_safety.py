"""Checkpoints are untrusted input and saves must not lose good state.

* A tampered torch_dist index (``.metadata``) never runs code: not on load, pretrained_checkpoint,
  finetune(), nor ``viaduct checkpoint inspect``; the error names the file. The allowlist of the
  index unpickler is exactly what real indexes hold.
* A DCP read error is one line naming the cause, not a formatted torch traceback.
* Non-finite weights are never saved: the tracker stays on the last good checkpoint (a real run).
* A full disk (a real 1 MiB tmpfs when mounting is permitted) is one clear error; earlier
  checkpoints stay intact.
* Retention removes a symbolic link to an old checkpoint, never its target, and never crashes.
"""

from __future__ import annotations

import argparse
import errno
import operator
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from viaduct.cli.checkpoint import add_checkpoint_parser, run_checkpoint
from viaduct.testing import tiny_pretrain_config
from viaduct.training.callbacks import Callback, CallbackContext
from viaduct.training.checkpoint import layout as L
from viaduct.training.checkpoint.dcp_index import ALLOWED_GLOBALS, CheckpointIndexError, read_index
from viaduct.training.checkpointing import Checkpointer, CheckpointError, CheckpointSaveError
from viaduct.training.pretrain import finetune, pretrain

# The tiny GPT, its run and config of the checkpoint tests (this directory is on sys.path under pytest).
sys.path.insert(0, str(Path(__file__).parent))
from test_checkpointing import Run, ctx1, make_cfg

QUIET = ("train.eval_iters=0", "dataset.num_workers=0")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch_dist checkpoint root with step 1 of the tiny test GPT."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    cfg = make_cfg(save=str(root))
    Run(cfg).step(1).save(Checkpointer(cfg, ctx1()))
    return root


class _Call:
    """Pickles as a call of `fn(*args)`: what a crafted file makes pickle.load run."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.fn, self.args


def _payload(kind: str, marker: Path, real: Any) -> bytes:
    if kind == "os.system":
        return pickle.dumps(_Call(os.system, f"touch {marker}"))
    if kind == "open":  # pickled as io.open
        return pickle.dumps(_Call(open, str(marker), "w"))
    if kind == "builtins.exec":
        return pickle.dumps(_Call(exec, f"open({str(marker)!r}, 'w').close()"))
    # Stealthy: runs the command, then returns the real index, so that a plain pickle.load loads the
    # checkpoint as if nothing happened.
    return pickle.dumps(_Call(operator.itemgetter(1), (_Call(os.system, f"touch {marker}"), real)))


def _tamper(src: Path, dest: Path, kind: str) -> tuple[Path, Path]:
    """A copy of checkpoint root `src` whose index carries payload `kind`; returns (iter dir, marker)."""
    shutil.copytree(src, dest)
    it = dest / "iter_0000001"
    marker = dest.parent / f"pwned-{uuid.uuid4().hex}"
    index = it / ".metadata"
    with open(index, "rb") as f:
        real = pickle.load(f)  # the file this test wrote itself
    index.write_bytes(_payload(kind, marker, real))
    return it, marker


PAYLOADS = ["os.system", "open", "builtins.exec", "stealth"]


def test_the_payloads_do_run_under_plain_pickle(saved: Path, tmp_path: Path) -> None:
    # What DCP's own FileSystemReader.read_metadata() does: the attack is real.
    for kind in PAYLOADS:
        it, marker = _tamper(saved, tmp_path / kind, kind)
        with open(it / ".metadata", "rb") as f:
            pickle.load(f)
        assert marker.exists(), kind
        marker.unlink()


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("field", ["load", "pretrained_checkpoint"])
def test_tampered_index_never_runs_code_on_load(saved: Path, tmp_path: Path, kind: str, field: str) -> None:
    it, marker = _tamper(saved, tmp_path / "c", kind)
    cfg = make_cfg(**{field: str(tmp_path / "c")})
    with pytest.raises(CheckpointError) as info:
        Run(cfg).load(Checkpointer(cfg, ctx1()))
    assert not marker.exists()
    assert isinstance(info.value, ValueError)
    text = str(info.value)
    assert f"checkpoint.{field}" in text and str(it / ".metadata") in text
    assert "refused without running it" in text and "Traceback" not in text


@pytest.mark.parametrize("kind", PAYLOADS)
def test_tampered_index_never_runs_code_on_inspect(
    saved: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    it, marker = _tamper(saved, tmp_path / "c", kind)
    parser = argparse.ArgumentParser()
    add_checkpoint_parser(parser.add_subparsers(dest="command"))
    assert run_checkpoint(parser.parse_args(["checkpoint", "inspect", str(it)])) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert str(it / ".metadata") in err and "refused" in err and "Traceback" not in err


def test_index_errors_are_value_errors_naming_the_file(saved: Path, tmp_path: Path) -> None:
    it, marker = _tamper(saved, tmp_path / "c", "open")
    with pytest.raises(CheckpointIndexError, match="refers to io.open") as info:
        read_index(it)
    assert isinstance(info.value, ValueError) and info.value.path == it / ".metadata"
    assert not marker.exists()
    # A byte-stream entry (which DCP would unpickle with weights_only=False) and a shard outside the
    # directory are refused too, although their classes are DCP's own.
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    real = read_index(saved / "iter_0000001")
    real.state_dict_metadata["model.extra"] = BytesStorageMetadata()
    (it / ".metadata").write_bytes(pickle.dumps(real))
    with pytest.raises(CheckpointIndexError, match="BytesStorageMetadata"):
        read_index(it)
    real = read_index(saved / "iter_0000001")
    first = next(iter(real.storage_data))
    real.storage_data[first].relative_path = "../../outside.distcp"
    (it / ".metadata").write_bytes(pickle.dumps(real))
    with pytest.raises(CheckpointIndexError, match="points outside the checkpoint directory"):
        read_index(it)
    (it / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointIndexError, match="corrupt"):
        read_index(it)


def _globals_in(data: bytes) -> set[tuple[str, str]]:
    """Every (module, name) a pickle resolves, read from its opcodes (memoised strings included)."""
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        if op.name not in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "MEMOIZE"):
            if op.name not in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(None)
    return found


def test_allowlist_is_exactly_what_real_indexes_hold(tmp_path: Path) -> None:
    # bf16 weights with float32 masters and Adam state: every dtype and class a viaduct index uses.
    cfg = make_cfg(save=str(tmp_path))
    Run(cfg).step(1).save(Checkpointer(cfg, ctx1()))
    used = _globals_in((tmp_path / "iter_0000001" / ".metadata").read_bytes())
    dtypes = {g for g in used if g[0] == "torch" and isinstance(getattr(torch, g[1], None), torch.dtype)}
    assert dtypes == {("torch", "bfloat16"), ("torch", "float32")}
    # Nothing beyond the allowlist, and nothing in it unused (the pathlib._local spelling is the
    # same class under Python 3.13, where pathlib became a package).
    alias = ("pathlib._local", "PosixPath") if sys.version_info < (3, 13) else ("pathlib", "PosixPath")
    assert used - dtypes == set(ALLOWED_GLOBALS) - {alias}


def test_real_indexes_load_through_the_safe_reader(saved: Path) -> None:
    cfg = make_cfg(pretrained_checkpoint=str(saved))
    run = Run(cfg, seed=3)
    assert run.load(Checkpointer(cfg, ctx1())) == 0
    assert len(read_index(saved / "iter_0000001").state_dict_metadata) > 10


@pytest.mark.slow
def test_finetune_with_a_stealthy_index_stops_before_training(tmp_path: Path) -> None:
    root = tmp_path / "pre"
    pretrain(tiny_pretrain_config("train.train_iters=1", *QUIET, f"checkpoint.save={root}"))
    index = root / "iter_0000001" / ".metadata"
    marker = tmp_path / "pwned"
    with open(index, "rb") as f:
        real = pickle.load(f)
    index.write_bytes(_payload("stealth", marker, real))
    cfg = tiny_pretrain_config(
        "train.train_iters=2",
        *QUIET,
        f"checkpoint.pretrained_checkpoint={root}",
        f"checkpoint.save={tmp_path / 's'}",
    )
    with pytest.raises(CheckpointError, match="refused without running it"):
        finetune(cfg)
    assert not marker.exists()
    assert not (tmp_path / "s" / "iter_0000002").exists()


# ------------------------------------------------------------------------------------------ read errors


def test_truncated_shard_on_load_is_one_line_naming_the_shard(saved: Path, tmp_path: Path) -> None:
    shutil.copytree(saved, tmp_path / "c")
    shard = sorted((tmp_path / "c" / "iter_0000001").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = make_cfg(load=str(tmp_path / "c"))
    with pytest.raises(CheckpointError) as info:
        Run(cfg).load(Checkpointer(cfg, ctx1()))
    text = str(info.value)
    assert f"shard {shard.name} is truncated" in text and str(shard) in text
    assert "Traceback" not in text and 'File "' not in text


def test_corrupt_shard_data_names_the_cause_per_rank(saved: Path, tmp_path: Path) -> None:
    # Right size, wrong bytes: only DCP's reader finds out, inside its CheckpointException.
    shutil.copytree(saved, tmp_path / "c")
    for shard in (tmp_path / "c" / "iter_0000001").glob("*.distcp"):
        shard.write_bytes(b"\0" * shard.stat().st_size)
    cfg = make_cfg(load=str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match="cannot read its tensors") as info:
        Run(cfg).load(Checkpointer(cfg, ctx1()))
    text = str(info.value)
    assert "rank 0: " in text
    assert "Traceback" not in text and 'File "' not in text and "CheckpointException" not in text


# ---------------------------------------------------------------------------------------- NaN weights


class _PoisonAt(Callback):
    """Puts a NaN into one weight at the end of step `step`, right before that step's save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, ctx: CallbackContext) -> None:
        if ctx.state.train_state.step == self.step:
            model = ctx.model.module if hasattr(ctx.model, "module") else ctx.model
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_nan_weights_are_never_saved_and_the_tracker_stays_on_the_last_good(
    tmp_path: Path, async_save: bool
) -> None:
    root = tmp_path / "ckpt"
    cfg = tiny_pretrain_config(
        "train.train_iters=6",
        *QUIET,
        "logger.log_interval=100",  # no log step (the loss check) between the poison and the save
        f"checkpoint.save={root}",
        "checkpoint.save_interval=2",
        f"checkpoint.async_save={str(async_save).lower()}",
    )
    with pytest.raises(CheckpointSaveError) as info:
        pretrain(cfg, callbacks=[_PoisonAt(4)])
    text = str(info.value)
    assert "NaN or infinite weights at iteration 4" in text
    assert str(root / "iter_0000002") in text and "last good checkpoint" in text
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    # The kept checkpoint is finite and loads.
    state = torch.load(root / "latest_train_state.pt", weights_only=True)
    assert state["step"] == 2


def test_nan_check_refuses_inf_too_and_passes_large_finite_weights(tmp_path: Path) -> None:
    cfg = make_cfg(save=str(tmp_path))
    run = Run(cfg).step(1)
    ckpt = Checkpointer(cfg, ctx1())
    with torch.no_grad():
        p = next(run.model.parameters())
        p.view(-1)[0] = 3e38  # close to float32's largest: a 2-norm would overflow, the max-norm not
    run.save(ckpt)
    with torch.no_grad():
        p.view(-1)[1] = float("inf")
    run.train_state.step = 2
    with pytest.raises(CheckpointSaveError, match="NaN or infinite weights at iteration 2"):
        run.save(ckpt)
    assert L.read_tracker(tmp_path) == 1 and not (tmp_path / "iter_0000002.tmp").exists()


# ------------------------------------------------------------------------------------------ full disk


def _mount_tmpfs(where: Path, size: str = "1m") -> None:
    """Mount a real tmpfs at `where` (skips the test where mounting is not permitted)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at the end of the test."""
    points: list[Path] = []
    yield points
    for p in reversed(points):
        subprocess.run(["umount", "-l", str(p)], check=False)


def _big_cfg(save: Path) -> Any:
    cfg = make_cfg(save=str(save))
    cfg.model.hidden_size = 128  # about 3 MB of weights, masters and moments: more than the disk
    cfg.model.ffn_hidden_size = None
    return cfg.validate(world_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_is_one_clear_error_and_earlier_checkpoints_stay(
    tmp_path: Path, mounts: list[Path], async_save: bool
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount_tmpfs(disk)  # a real 1 MiB file system
    mounts.append(disk)
    root = disk / "ckpt"
    small = make_cfg(save=str(root), async_save=async_save)
    run = Run(small).step(1)
    ckpt = Checkpointer(small, ctx1())
    run.save(ckpt)  # fits
    ckpt.finalize()
    good = sorted(p.name for p in (root / "iter_0000001").rglob("*"))

    big_cfg = _big_cfg(root)
    big_cfg.checkpoint.async_save = async_save
    big = Run(big_cfg).step(1)
    big.train_state.step = 2
    ckpt = Checkpointer(big_cfg, ctx1())
    with pytest.raises(CheckpointSaveError) as info:
        big.save(ckpt)
        ckpt.finalize()  # async: the background write's error
    err = info.value
    assert isinstance(err, ValueError) and err.os_error.errno == errno.ENOSPC
    assert len(err.problems) == 1 and "\n" not in str(err.problems[0])  # one line
    text = str(err)
    assert "no space left on the device (ENOSPC)" in text and "iteration 2" in text
    assert str(root / "iter_0000001") in text and "GB" in text and "partial directory is removed" in text
    assert err.__cause__ is None and err.__suppress_context__  # no chain of tracebacks
    # The earlier checkpoint is intact and still the newest; the partial directory is gone.
    assert L.read_tracker(root) == 1
    assert sorted(p.name for p in (root / "iter_0000001").rglob("*")) == good
    assert not (root / "iter_0000002.tmp").exists() and not (root / "iter_0000002").exists()
    fresh = Run(small, seed=7)
    assert Checkpointer(make_cfg(load=str(root)), ctx1()).load(**fresh.objects()) == 1


def test_enospc_from_a_real_dcp_shard_write_is_named_in_one_line(tmp_path: Path) -> None:
    # Without mounting: /dev/full fails every write with ENOSPC. DCP opens its shard by name, so a
    # shard that is a link to /dev/full makes its real write fail inside DCP's writer. That shard is
    # mostly written by DCP's extra writer thread, whose errors DCP itself drops: the save returned
    # as if it had succeeded, with an index that lacked the tensor.
    from viaduct.training.checkpoint.save_guard import SaveErrors
    from viaduct.training.checkpoint.storage import DcpStorage

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    tmp = tmp_path / "iter_0000005.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").symlink_to("/dev/full")
    tensors = {"model.a": torch.ones(1000), "model.b": torch.ones(1000)}
    explain = SaveErrors(5, tmp_path, tmp, 4000, 4000)
    with pytest.raises(CheckpointSaveError, match=r"no space left on the device \(ENOSPC\)") as info:
        explain.run(lambda: DcpStorage(rank=0, world_size=1).write(tmp, tensors))
    assert info.value.os_error.errno == errno.ENOSPC
    assert "iteration 5" in str(info.value) and "no earlier checkpoint exists" in str(info.value)
    assert "CheckpointException" not in str(info.value) and info.value.__cause__ is None


# ------------------------------------------------------------------------------------------- retention


@pytest.mark.slow
def test_retention_removes_a_symlinked_checkpoint_but_never_its_target(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    cfg = make_cfg(save=str(root), most_recent_k=1)
    run = Run(cfg).step(1)
    run.save(Checkpointer(make_cfg(save=str(tmp_path / "elsewhere")), ctx1()))
    target = tmp_path / "elsewhere" / "iter_0000001"
    before = sorted(p.name for p in target.rglob("*"))
    root.mkdir()
    (root / "iter_0000001").symlink_to(target, target_is_directory=True)
    # A leftover .deleting that is a link, as a crash during an earlier retention leaves it.
    (root / "iter_0000000.deleting").symlink_to(target, target_is_directory=True)
    ckpt = Checkpointer(cfg, ctx1())
    run.step(1).save(ckpt)  # step 2: retention lets step 1 go
    run.step(1).save(ckpt)  # step 3: and cleans up
    ckpt.finalize()
    assert sorted(p.name for p in target.rglob("*")) == before  # the target survives, whole
    names = sorted(p.name for p in root.iterdir())
    assert "iter_0000001" not in names and "iter_0000000.deleting" not in names
    assert "iter_0000003" in names and L.read_tracker(root) == 3


def test_a_checkpoint_that_cannot_be_removed_is_a_warning_not_a_crash(
    tmp_path: Path, mounts: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    # A mount point cannot be renamed or removed (EBUSY), for root too: a real failed deletion.
    root = tmp_path / "ckpt"
    stuck = root / "iter_0000000"
    stuck.mkdir(parents=True)
    _mount_tmpfs(stuck)
    mounts.append(stuck)
    cfg = make_cfg(save=str(root), most_recent_k=1)
    run = Run(cfg).step(1)
    ckpt = Checkpointer(cfg, ctx1())
    with caplog.at_level("WARNING", logger="viaduct"):
        run.save(ckpt)
        run.step(1).save(ckpt)
        ckpt.finalize()
    assert L.read_tracker(root) == 2  # both saves went through
    assert "could not" in caplog.text and "iter_0000000" in caplog.text
    assert not (root / "iter_0000001").exists()  # an ordinary old checkpoint is still removed
