"""Checkpoints across parallel layouts, with real gloo processes (viaduct.testing.run_distributed).

A checkpoint saved by sharded data parallelism (FSDP2: every parameter and optimizer state a DTensor
shard), hybrid sharding or tensor parallelism loads into any other layout and into one process, and
back. What a phase saved (gathered into full tensors with `full_tensor()`) must equal what the next
phase holds right after loading: weights, the float32 master weights and the optimizer state. Where
the layout stays the same, the resumed losses equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from viaduct.config import ConfigError
from viaduct.testing import assert_identical, free_port, run_distributed, tiny_pretrain_config

COMMON = (
    "train.eval_iters=0",
    "dataset.num_workers=0",
    "logger.log_interval=100",
    "optimizer.optimizer=adam",
)
FSDP = ("ddp.use_distributed_optimizer=true",)
BF16 = ("mixed_precision=bf16_mixed",)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathered from every rank's shard for a DTensor)."""
    whole = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()
    return whole.cpu().clone()


def _snapshot(model: Any, optimizer: Any) -> dict[str, Any]:
    """Full copies of the weights, the float32 version of each (its master) and the optimizer state."""
    model = getattr(model, "module", model)  # DDP's wrapper
    state = optimizer.state_dict()
    return {
        "weights": {n: _full(p) for n, p in model.named_parameters()},
        "float32": {s.name: _full(s.master) for s in optimizer.slots},
        "state": {
            name: {k: _full(v) for k, v in per.items() if isinstance(v, torch.Tensor)}
            for name, per in state["state"].items()
        },
    }


def _pretrain(overrides: list[str]) -> dict[str, Any]:
    """One pretrain() run: its losses, what it held after loading and what each save wrote."""
    from viaduct.training.callbacks import Callback
    from viaduct.training.pretrain import pretrain

    class Record(Callback):
        def __init__(self) -> None:
            self.out: dict[str, Any] = {"losses": [], "loaded": None, "saved": {}}

        def on_train_start(self, ctx: Any) -> None:
            self.out["loaded"] = _snapshot(ctx.model, ctx.optimizer)

        def on_train_step_end(self, ctx: Any) -> None:
            self.out["losses"].append(float(ctx.metrics["losses"]["lm loss"]))

        def on_checkpoint_save(self, ctx: Any) -> None:
            self.out["saved"][int(ctx.metrics["step"])] = _snapshot(ctx.model, ctx.optimizer)

    rec = Record()
    pretrain(tiny_pretrain_config(*COMMON, *overrides), callbacks=[rec])
    return rec.out


def _on_ranks(rank: int, world: int, phases: list[list[str]], ports: list[int]) -> list[dict[str, Any]]:
    # One intra-op thread per process: several ranks share two cores.
    torch.set_num_threads(1)
    out = []
    for overrides, port in zip(phases, ports):
        # A rendezvous port per pretrain(): a second FSDP run in the same processes, on the first
        # one's port, hangs in init_process_group (plain data-parallel runs do not).
        os.environ["MASTER_PORT"] = str(port)
        out.append(_pretrain(overrides))
    return out


def _run(world: int, *phases: list[str], timeout: float = 150) -> list[dict[str, Any]]:
    """Each override list is one pretrain() on `world` ranks (in this process when `world` is 1)."""
    if world == 1:
        return [_pretrain(p) for p in phases]
    ports = [free_port() for _ in phases]
    return run_distributed(_on_ranks, world, list(phases), ports, timeout=timeout, reuse=True)


def _ckpt(save: Path, *, load: bool = True) -> list[str]:
    return [f"checkpoint.save={save}", *([f"checkpoint.load={save}"] if load else [])]


def _same_state(a: dict[str, Any], b: dict[str, Any], *, weights: bool = True) -> None:
    """The float32 weights and the optimizer state are identical (and the weights, with `weights`)."""
    assert_identical(a["float32"], b["float32"])
    assert_identical(a["state"], b["state"])
    if weights:
        assert_identical(a["weights"], b["weights"])


# ----------------------------------------------------------------------------------------- sharded


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_fsdp_resume_is_bitwise_and_its_checkpoint_loads_in_one_process(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    four = ["train.train_iters=4"]
    straight, first, resumed = _run(
        2,
        [*FSDP, *four],
        [*FSDP, *four, "train.exit_interval=2", *_ckpt(save, load=False)],
        [*FSDP, *four, *_ckpt(save)],
    )
    assert len(straight["losses"]) == 4 and len(first["losses"]) == 2 and len(resumed["losses"]) == 2
    assert first["losses"] + resumed["losses"] == straight["losses"]
    _same_state(first["saved"][2], resumed["loaded"])

    meta = json.loads((save / "iter_0000002" / "metadata.json").read_text())
    assert meta["parallel_layout"]["describe"] == "dp 2 (sharded, optim) × cp 1 × tp 1"
    assert (meta["parallel_layout"]["dp_shard"], meta["world_size"]) == (2, 2)

    # One process, plain (unsharded) parameters: the gathered shards, exactly.
    (single,) = _run(1, ["train.train_iters=3", f"checkpoint.load={save}", "checkpoint.ckpt_step=2"])
    _same_state(first["saved"][2], single["loaded"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_bf16_masters_move_between_one_process_and_fsdp_without_losing_precision(tmp_path: Path) -> None:
    one_dir, fsdp_dir, back_dir = tmp_path / "one", tmp_path / "fsdp", tmp_path / "back"
    # One process: bf16 parameters, float32 master copies in the optimizer.
    five = ["train.train_iters=5"]  # one schedule throughout: runs stop early with exit_interval
    (one,) = _run(1, [*BF16, *five, "train.exit_interval=2", f"checkpoint.save={one_dir}"])
    saved = one["saved"][2]
    assert {w.dtype for w in saved["weights"].values()} == {torch.bfloat16}
    # The masters carry more than their bf16 images: a load that went through bf16 would show.
    assert any(not torch.equal(m, m.bfloat16().float()) for m in saved["float32"].values())

    # FSDP on 2 ranks: float32 shards that are their own masters, computing in bf16 (the ranks share
    # the reading of the plain tensors: fully_parallel_load). Then weights only: the bf16 weights,
    # widened into the float32 shards.
    fsdp, fsdp_weights_only = _run(
        2,
        [
            *FSDP,
            *BF16,
            *five,
            "train.exit_interval=4",
            f"checkpoint.load={one_dir}",
            f"checkpoint.save={fsdp_dir}",
            "checkpoint.fully_parallel_load=true",
        ],
        [
            *FSDP,
            *BF16,
            *five,
            "train.exit_interval=3",
            f"checkpoint.load={one_dir}",
            "checkpoint.finetune=true",
        ],
    )
    _same_state(saved, fsdp["loaded"], weights=False)
    assert_identical(fsdp["loaded"]["weights"], saved["float32"])  # the masters, not the bf16 weights
    widened = {n: w.float() for n, w in saved["weights"].items()}
    assert_identical(fsdp_weights_only["loaded"]["weights"], widened)

    # And back into one process: the float32 shards become the masters, their bf16 images the weights.
    (back,) = _run(1, [*BF16, *five, f"checkpoint.load={fsdp_dir}", f"checkpoint.save={back_dir}"])
    fsdp_saved = fsdp["saved"][4]
    _same_state(fsdp_saved, back["loaded"], weights=False)
    assert_identical(back["loaded"]["weights"], {n: w.bfloat16() for n, w in fsdp_saved["weights"].items()})

    # The same five steps in one process, uninterrupted: the layouts differ only in summation order.
    (straight,) = _run(1, [*BF16, *five])
    resumed = one["losses"] + fsdp["losses"] + back["losses"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight["losses"]), rtol=2e-3, atol=0)

    # Weights only (no optimizer state): the 16-bit weights, widened, as Megatron resets masters from
    # them; with load_main_params_from_ckpt the checkpoint's float32 masters instead.
    (weights_only,) = _run(
        1, ["train.train_iters=3", f"checkpoint.load={one_dir}", "checkpoint.finetune=true"]
    )
    assert_identical(weights_only["loaded"]["weights"], {n: w.float() for n, w in saved["weights"].items()})
    (masters,) = _run(
        1,
        [
            "train.train_iters=3",
            f"checkpoint.load={one_dir}",
            "checkpoint.load_optim=false",
            "checkpoint.load_main_params_from_ckpt=true",
        ],
    )
    assert_identical(masters["loaded"]["weights"], saved["float32"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_hybrid_sharded_checkpoint_is_written_once_and_loads_into_fsdp(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    # 4 ranks: 2 replicas (num_distributed_optimizer_instances) of a model sharded over 2 ranks each.
    hsdp = [*FSDP, "ddp.num_distributed_optimizer_instances=2", "train.micro_batch_size=2"]
    # Rank 0 writes the plain tensors (Adam's step counts); every rank its shards.
    (first,) = _run(
        4,
        [
            *hsdp,
            "train.train_iters=4",
            "train.exit_interval=2",
            f"checkpoint.save={save}",
            "checkpoint.fully_parallel_save=false",
        ],
    )
    directory = save / "iter_0000002"
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["parallel_layout"]["describe"] == "dp 4 (2 replicas × 2 shards, optim) × cp 1 × tp 1"
    # Each shard once: the replicas' copies are not written again.
    written = sum(f.stat().st_size for f in directory.glob("*.distcp"))
    assert meta["tensor_bytes"] <= written < 1.2 * meta["tensor_bytes"]

    (fsdp,) = _run(2, [*FSDP, "train.train_iters=4", f"checkpoint.load={save}"])
    _same_state(first["saved"][2], fsdp["loaded"])
    assert len(fsdp["losses"]) == 2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_async_save_of_sharded_state_resumes_bitwise(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    four = [*FSDP, "train.train_iters=4"]
    saving = [*four, "checkpoint.async_save=true"]
    straight, first, resumed = _run(
        2, four, [*saving, "train.exit_interval=2", *_ckpt(save, load=False)], [*saving, *_ckpt(save)]
    )
    _same_state(first["saved"][2], resumed["loaded"])
    assert first["losses"] + resumed["losses"] == straight["losses"]


def _sharded_by_hand(rank: int, world: int, torch_ckpt: str, save: str) -> dict[str, torch.Tensor]:
    """An FSDP model built as pretrain() builds it: load a one-file ("torch" format) checkpoint into
    its shards, then try to save with a NaN in rank 1's shard only."""
    import torch.distributed as dist

    from viaduct.distributed.init import DistributedContext
    from viaduct.distributed.layout import layout_of
    from viaduct.distributed.mesh import build_mesh
    from viaduct.distributed.parallelize import build_parallel_model
    from viaduct.training.checkpoint.errors import CheckpointSaveError
    from viaduct.training.checkpoint.flat import model_tensors
    from viaduct.training.checkpoint.storage import TorchStorage
    from viaduct.training.checkpointing import Checkpointer
    from viaduct.training.optim import build_optimizer
    from viaduct.training.state import TrainState

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = tiny_pretrain_config(*COMMON, *FSDP, f"checkpoint.load={torch_ckpt}", f"checkpoint.save={save}")
        cfg.model.vocab_size = 259  # what pretrain() takes from the byte-level tokenizer
        cfg.validate(world_size=world)
        device = torch.device("cpu")
        ctx = DistributedContext(rank=rank, world_size=world, backend="gloo", host_group=dist.group.WORLD)
        ctx.parallel = build_mesh(layout_of(cfg, world), device)
        model = build_parallel_model(cfg, cfg.model, ctx.parallel, device, compile_layers=False)
        optimizer = build_optimizer(cfg.optimizer, model)
        ckpt = Checkpointer(cfg, ctx)
        assert ckpt.load(model=model, optimizer=optimizer, scheduler=None, train_state=TrainState()) == 2
        loaded = {n: _full(p) for n, p in model.named_parameters()}

        # One file written by rank 0 cannot hold the other ranks' shards.
        with pytest.raises(ConfigError, match="checkpoint.ckpt_format"):
            TorchStorage(rank=rank).share(model_tensors(model))

        # A NaN in one rank's shard refuses the save on every rank, before anything is written.
        if rank == 1:
            with torch.no_grad():
                next(iter(model.parameters())).to_local()[0] = float("nan")
        with pytest.raises(CheckpointSaveError, match="NaN or infinite weights"):
            ckpt.save(3, model=model, optimizer=optimizer, scheduler=None, train_state=TrainState(step=3))
        assert not list(Path(save).glob("iter_*"))
        ckpt.finalize()
        return loaded
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_one_file_checkpoint_loads_into_shards_and_a_nan_in_one_shard_refuses_the_save(
    tmp_path: Path,
) -> None:
    torch_ckpt = tmp_path / "one_file"
    (one,) = _run(1, ["train.train_iters=2", f"checkpoint.save={torch_ckpt}", "checkpoint.ckpt_format=torch"])
    assert (torch_ckpt / "iter_0000002" / "model_optim.pt").is_file()
    loaded = run_distributed(_sharded_by_hand, 2, str(torch_ckpt), str(tmp_path / "nan"), timeout=90)
    assert_identical(loaded, one["saved"][2]["weights"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_tensor_parallel_checkpoint_loads_into_fsdp_and_into_one_process(tmp_path: Path) -> None:
    from viaduct.training.checkpoint.inspect import format_inspection, inspect_checkpoint

    tp_dir, fsdp_dir = tmp_path / "tp", tmp_path / "fsdp"
    # 260 rows pad alike for 1 and 2 tensor-parallel ranks (the byte-level tokenizer has 259 ids).
    six = ["train.train_iters=6", "model.vocab_size=260"]
    (tp,) = _run(
        4,
        [
            *FSDP,
            *six,
            "model.tensor_model_parallel_size=2",
            "train.exit_interval=2",
            f"checkpoint.save={tp_dir}",
        ],
    )
    text = format_inspection(inspect_checkpoint(tp_dir))
    assert "parallel layout: dp 2 (sharded, optim) × cp 1 × tp 2" in text

    (fsdp,) = _run(
        4,
        [
            *FSDP,
            *six,
            "train.micro_batch_size=2",
            "train.exit_interval=4",
            f"checkpoint.load={tp_dir}",
            f"checkpoint.save={fsdp_dir}",
        ],
    )
    _same_state(tp["saved"][2], fsdp["loaded"])

    (single,) = _run(1, [*six, "train.exit_interval=5", f"checkpoint.load={fsdp_dir}"])
    _same_state(fsdp["saved"][4], single["loaded"])

    (straight,) = _run(1, [*six, "train.exit_interval=5"])
    resumed = tp["losses"] + fsdp["losses"] + single["losses"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight["losses"]), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------- the resume report


def _saved_run_config(tmp_path: Path, *overrides: str) -> Path:
    """A run_config.yaml as a checkpoint holds it (the saving run's validated config)."""
    path = tmp_path / "run_config.yaml"
    tiny_pretrain_config(*COMMON, *overrides).validate(world_size=1).to_yaml(path)
    return path


def _resuming(world: int, *overrides: str) -> Any:
    return tiny_pretrain_config(*COMMON, *overrides).validate(world_size=world)


def test_a_layout_change_is_accepted_and_named_on_one_line(tmp_path: Path, caplog: Any) -> None:
    from viaduct.training.checkpoint.config_check import check_resume_config

    saved = _saved_run_config(tmp_path, "model.vocab_size=260")
    current = _resuming(
        4,
        "model.vocab_size=260",
        "model.tensor_model_parallel_size=2",
        "ddp.use_distributed_optimizer=true",
        "ddp.num_distributed_optimizer_instances=2",
        "optimizer.lr=3e-4",
    )
    with caplog.at_level(logging.INFO, logger="viaduct"):
        lines = check_resume_config(saved, current, saved_world_size=1, world_size=4)
    (layout,) = [line for line in lines if "parallel layout" in line]
    assert layout == (
        "resuming with a different parallel layout: model.tensor_model_parallel_size: 1 -> 2, "
        "ddp.use_distributed_optimizer: False -> True, ddp.num_distributed_optimizer_instances: 1 -> 2, "
        "world size: 1 -> 4 "
        "(dp 1 (replicated) × cp 1 × tp 1 -> dp 2 (2 replicas × 1 shards, optim) × cp 1 × tp 2)"
    )
    assert layout in caplog.text
    # The other changes are listed as before, without the layout's fields.
    assert any(line.startswith("optimizer.lr: ") for line in lines)
    assert not any(line.startswith("model.tensor_model_parallel_size") for line in lines)

    # The same layout again, on as many ranks: nothing to say.
    same = _resuming(1, "model.vocab_size=260")
    assert check_resume_config(saved, same, saved_world_size=1, world_size=1) == []


def test_a_layout_change_that_repads_the_vocabulary_is_refused_naming_tensor_parallelism(
    tmp_path: Path,
) -> None:
    from viaduct.training.checkpoint.config_check import check_resume_config

    saved = _saved_run_config(tmp_path, "model.vocab_size=259")  # 259 rows on one rank, 260 on two
    current = _resuming(2, "model.vocab_size=259", "model.tensor_model_parallel_size=2")
    with pytest.raises(ConfigError) as exc:
        check_resume_config(saved, current, saved_world_size=1, world_size=2)
    (problem,) = exc.value.problems
    assert problem.path == "model.tensor_model_parallel_size"
    assert "from 259 to 260" in problem.message and "tensor-parallel size (1 -> 2" in problem.message
    assert "tensor_model_parallel_size=1" in (problem.fix or "")
