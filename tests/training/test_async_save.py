"""checkpoint.async_save: staged in CPU memory, written in a background thread, waited for and checked.

A real tiny pretrain run saving asynchronously writes what a synchronous one writes and resumes
bitwise; the staged copy is immune to training changing the model right after save() returns; the
next save waits for the previous one; a background error surfaces from finalize() (or the next save);
and two gloo ranks agree over the writer's own group.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from viaduct.distributed.init import DistributedContext
from viaduct.testing import assert_identical, run_distributed, tiny_pretrain_config
from viaduct.training.checkpoint.async_writer import AsyncWriter
from viaduct.training.checkpoint.dcp_index import SafeFileSystemReader, read_index
from viaduct.training.checkpoint.flat import nbytes
from viaduct.training.checkpoint.staging import StagingArena
from viaduct.training.checkpointing import Checkpointer
from viaduct.training.config import ConfigContainer
from viaduct.training.optim import build_optimizer
from viaduct.training.pretrain import pretrain
from viaduct.training.scheduler import build_scheduler
from viaduct.training.state import TrainState

COMMON = ("train.eval_iters=0", "dataset.num_workers=0", "logger.log_interval=100")


def _losses(cfg: ConfigContainer) -> list[float]:
    from viaduct.training.callbacks import Callback

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_step_end(self, ctx: Any) -> None:
            self.values.append(float(ctx.metrics["losses"]["lm loss"]))

    rec = Losses()
    pretrain(cfg, callbacks=[rec])
    return rec.values


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _dcp_tensors(directory: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_index(directory)  # never DCP's own reader: it unpickles with plain pickle
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=SafeFileSystemReader(directory), no_dist=True)
    return out


def _assert_same_checkpoints(sync_root: Path, async_root: Path) -> None:
    assert _files(sync_root) == _files(async_root)
    for rel in _files(sync_root):
        a, b = sync_root / rel, async_root / rel
        if rel.endswith(".pt"):
            assert_identical(torch.load(a, weights_only=True), torch.load(b, weights_only=True), rel)
        elif rel.endswith("metadata.json"):
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            ma.pop("saved_at"), mb.pop("saved_at")
            assert ma == mb, rel
        elif rel.endswith(".metadata"):
            assert_identical(_dcp_tensors(a.parent), _dcp_tensors(b.parent), rel)
        elif rel.endswith(".txt"):
            assert a.read_text() == b.read_text(), rel


@pytest.mark.slow
def test_async_pretrain_writes_what_sync_writes_and_resumes_bitwise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 steps saving every 2 (sync vs async), then a resume from the async checkpoint for 2 more."""
    caplog.set_level("INFO", logger="viaduct")
    straight = _losses(tiny_pretrain_config(*COMMON, "train.train_iters=6"))
    runs = {}
    for mode in ("sync", "async"):
        save = tmp_path / mode
        runs[mode] = _losses(
            tiny_pretrain_config(
                *COMMON,
                "train.train_iters=6",
                "train.exit_interval=4",
                "checkpoint.save_interval=2",
                f"checkpoint.async_save={mode == 'async'}",
                f"checkpoint.save={save}",
            )
        )
    assert runs["sync"] == runs["async"] == straight[:4]
    # The loop prepared the staging memory after its first step: no save allocated any.
    staged = [r.getMessage() for r in caplog.records if "staged in CPU memory" in r.getMessage()]
    assert len(staged) == 2 and not any("newly allocated" in m for m in staged), staged
    sync_root, async_root = tmp_path / "sync", tmp_path / "async"
    assert sorted(p.name for p in async_root.iterdir()) == [
        ".lock",  # the run's lock of the directory (empty once released)
        "iter_0000002",
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
        "latest_train_state.pt",
    ]
    assert (async_root / "latest_checkpointed_iteration.txt").read_text() == "4\n"
    _assert_same_checkpoints(sync_root, async_root)

    resumed = _losses(
        tiny_pretrain_config(
            *COMMON,
            "train.train_iters=6",
            "checkpoint.async_save=true",
            f"checkpoint.save={async_root}",
            f"checkpoint.load={async_root}",
        )
    )
    assert runs["async"] + resumed == straight  # bitwise
    assert (async_root / "latest_checkpointed_iteration.txt").read_text() == "6\n"


# ------------------------------------------------------------------------------------ the Checkpointer


class Run:
    """The tiny config's model with a real optimizer and scheduler, stepped on random tokens."""

    def __init__(self, cfg: ConfigContainer, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = cfg.model.provide()
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.train_state = TrainState()

    def objects(self) -> dict[str, Any]:
        return dict(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, train_state=self.train_state
        )

    def step(self) -> Run:
        seq = self.cfg.model.seq_length
        x = torch.randint(0, 256, (2, seq))
        self.optimizer.zero_grad()
        self.model(x, labels=torch.roll(x, -1, 1)).float().mean().backward()
        self.optimizer.step()
        self.scheduler.step(8)
        self.train_state.step += 1
        return self

    def save(self, ckpt: Checkpointer) -> str:
        return ckpt.save(self.train_state.step, **self.objects())


def _cfg(save: Path, **overrides: Any) -> ConfigContainer:
    extra = [f"checkpoint.{k}={v}" for k, v in overrides.items()]
    cfg = tiny_pretrain_config(f"checkpoint.save={save}", f"checkpoint.load={save}", *extra)
    cfg.model.vocab_size = 256
    return cfg.validate()


@pytest.mark.slow
def test_prepared_staging_is_used_by_the_first_save(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, async_save=True)
    run = Run(cfg).step()
    ckpt = Checkpointer(cfg, DistributedContext())
    ckpt.prepare_staging(model=run.model, optimizer=run.optimizer)
    run.save(ckpt)
    assert ckpt._staging.allocated_bytes == 0 and ckpt._staging.nbytes > 0
    ckpt.finalize()
    assert ckpt._staging.nbytes == 0  # given back at the end of the run


@pytest.mark.slow
def test_staged_copy_is_immune_to_training_and_next_save_waits(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, async_save=True)
    run = Run(cfg).step()
    ckpt = Checkpointer(cfg, DistributedContext())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.save(ckpt)
    with torch.no_grad():  # training changes the weights while the write may still be running
        for p in run.model.parameters():
            p.zero_()
    run.step()
    run.save(ckpt)
    # The second save waited for the first: iter 1 is complete (final name) before save() returned.
    assert (tmp_path / "iter_0000001" / "metadata.json").is_file()
    assert not (tmp_path / "iter_0000001.tmp").exists()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() in ("1\n", "2\n")
    ckpt.finalize()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000001",
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
        "latest_train_state.pt",
    ]

    sync_cfg = _cfg(tmp_path, ckpt_step=1)
    fresh = Run(sync_cfg, seed=5)
    assert Checkpointer(sync_cfg, DistributedContext()).load(**fresh.objects()) == 1
    assert_identical(before, fresh.model.state_dict(), "model")  # not the zeros written after save()


def test_background_error_is_raised_by_finalize_and_by_the_next_save(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, async_save=True)
    run = Run(cfg).step()
    ckpt = Checkpointer(cfg, DistributedContext())
    # A directory where the tracker's temporary file must go: replacing the tracker fails for real.
    blocker = tmp_path / f".latest_checkpointed_iteration.txt.tmp-{os.getpid()}"
    blocker.mkdir()
    run.save(ckpt)  # returns: the error happens in the background
    with pytest.raises(RuntimeError, match="asynchronous checkpoint save of iteration 1") as info:
        ckpt.finalize()
    assert isinstance(info.value.__cause__, IsADirectoryError)
    assert not (tmp_path / "latest_checkpointed_iteration.txt").exists()  # tracker never half-updated

    ckpt = Checkpointer(cfg, DistributedContext())
    run.save(ckpt)
    run.step()
    with pytest.raises(RuntimeError, match="iteration 1"):
        run.save(ckpt)  # the next save reports the previous one's failure before starting
    blocker.rmdir()
    run.save(ckpt)
    ckpt.finalize()
    ckpt.finalize()  # nothing left in flight; an error is raised once
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2\n"


def test_staging_arena_is_reused_and_tied_tensors_staged_once() -> None:
    w = torch.randn(4, 3)
    tensors = {"a": w, "tied": w, "b": torch.arange(5)}
    arena = StagingArena()
    first = arena.stage(tensors)
    # One arena holds both tensors (each view 64-byte aligned); the tied one is staged once.
    assert first["a"] is first["tied"] and arena.allocated_bytes == arena.nbytes == 64 + 64
    assert first["a"].data_ptr() % 64 == 0 and first["b"].data_ptr() % 64 == 0
    w.add_(1)
    second = arena.stage(tensors)
    assert arena.allocated_bytes == 0 and second["a"].data_ptr() == first["a"].data_ptr()  # reused
    assert torch.equal(second["a"], w) and second["a"].data_ptr() != w.data_ptr()
    assert torch.equal(second["b"], torch.arange(5))
    # A changed layout (a tensor grew) gets a new arena.
    tensors["b"] = torch.arange(50)
    third = arena.stage(tensors)
    assert arena.allocated_bytes == 64 + 448 and torch.equal(third["b"], torch.arange(50))
    arena.release()
    assert arena.nbytes == 0


def test_staging_arena_prepared_in_the_background_is_used_by_the_next_stage() -> None:
    tensors = {"w": torch.randn(300_000), "i": torch.arange(7)}
    arena = StagingArena()
    arena.prepare(tensors, background=True)
    staged = arena.stage(tensors)
    assert arena.allocated_bytes == 0 and arena.build_seconds is not None  # built by prepare(), not here
    assert torch.equal(staged["w"], tensors["w"]) and torch.equal(staged["i"], tensors["i"])


@pytest.mark.slow
def test_short_host_memory_is_a_clear_error_for_async_and_a_warning_in_prepare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from viaduct.config import ConfigError
    from viaduct.training.checkpoint import staging

    monkeypatch.setattr(staging, "_available_host_memory", lambda: 1000)  # a host with 1 kB free
    cfg = _cfg(tmp_path, async_save=True)
    run = Run(cfg).step()
    ckpt = Checkpointer(cfg, DistributedContext())
    caplog.set_level("WARNING", logger="viaduct")
    ckpt.prepare_staging(model=run.model, optimizer=run.optimizer)
    ckpt._staging._join()
    assert any("staging memory failed" in r.getMessage() for r in caplog.records)  # said at once
    with pytest.raises(ConfigError) as err:
        run.save(ckpt)
    text = str(err.value)
    assert "checkpoint.async_save" in text and "GB are available" in text and "async_save=false" in text
    ckpt.finalize()
    assert not list(tmp_path.glob("iter_*"))  # nothing half-written under a final name


@pytest.mark.gpu
def test_short_host_memory_makes_a_sync_save_write_from_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from viaduct.training.checkpoint import staging

    monkeypatch.setattr(staging, "_available_host_memory", lambda: 1000)
    caplog.set_level("WARNING", logger="viaduct")
    cfg = _cfg(tmp_path)
    run = Run(cfg)
    run.model.cuda()
    run.optimizer = build_optimizer(cfg.optimizer, run.model)
    ckpt = Checkpointer(cfg, DistributedContext(device=torch.device("cuda")))
    path = Path(run.save(ckpt))
    fresh = Run(cfg, seed=3)
    assert Checkpointer(cfg, DistributedContext()).load(**fresh.objects()) == 0
    for (name, a), b in zip(run.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a.cpu(), b), name
    assert path.is_dir() and any("straight from the GPU" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_staging_arena_pins_in_pieces_of_whole_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    from viaduct.training.checkpoint import staging

    monkeypatch.setattr(staging, "_REGISTER_CHUNK", 4096)
    sizes = [100, 3000, 5000, 10, 700, 1]  # 5000 floats alone exceed a piece
    tensors = {f"t{i}": torch.randn(n, device="cuda") for i, n in enumerate(sizes)}
    tensors["bf16"] = torch.randn(33, 5, device="cuda", dtype=torch.bfloat16)
    arena = StagingArena()
    arena.prepare(tensors, background=True)  # from another thread, as the training loop does
    staged = arena.stage(tensors)
    assert arena.pinned and len(arena._registered) >= 4
    for key, t in tensors.items():
        assert staged[key].is_pinned() and torch.equal(staged[key], t.cpu()), key
    arena.release()
    assert not arena.pinned


def test_writer_runs_one_at_a_time() -> None:
    order: list[str] = []
    writer = AsyncWriter()
    writer.submit("a", lambda: order.append("a"))
    writer.submit("b", lambda: order.append("b"))  # waits for "a" first
    writer.wait()
    assert order == ["a", "b"] and not writer.busy


# ------------------------------------------------------------------------------------------- 2 ranks


def _two_rank_async(rank: int, world: int, root: str) -> list[str]:
    from viaduct.distributed.init import destroy_distributed, initialize_distributed

    cfg = _cfg(Path(root), async_save=True)
    ctx = initialize_distributed(cfg.dist)
    try:
        run = Run(cfg).step()  # same seed on both ranks: replicas, as under DDP
        ckpt = Checkpointer(cfg, ctx)
        run.save(ckpt)
        run.step()
        # The loop's host group is busy on this thread while the writer uses its own group.
        torch.distributed.barrier(group=ctx.host_group)
        run.save(ckpt)
        # Each rank staged its share only, not the whole replicated state.
        staged = torch.tensor([ckpt._staging.nbytes])
        shares = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        torch.distributed.all_gather(shares, staged, group=ctx.host_group)
        ckpt.finalize()
        names = sorted(p.name for p in (Path(root) / "iter_0000002").iterdir())
        total = nbytes(ckpt._tensors(run.model, run.optimizer)[0])
        return names, [int(x) for x in shares], total
    finally:
        destroy_distributed(ctx)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_save_asynchronously(tmp_path: Path) -> None:
    results = run_distributed(_two_rank_async, 2, str(tmp_path), timeout=60)
    names, shares, total = results
    assert all(0 < share < total for share in shares) and sum(shares) >= total, (shares, total)
    ranks = {n.split("_")[2] for n in names if n.endswith(".distcp")}  # __<rank>_<file>.distcp
    assert "rng" in names and ranks == {"0", "1"}
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    cfg = _cfg(tmp_path)
    fresh = Run(cfg, seed=3)
    assert Checkpointer(cfg, DistributedContext()).load(**fresh.objects()) == 2
