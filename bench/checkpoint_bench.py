"""Checkpoint speed: synchronous save, load and the time an async save blocks, one JSON line each.

    python bench/checkpoint_bench.py                       # Llama-3.2-1B, bf16 + fp32 masters, on CUDA
    python bench/checkpoint_bench.py --small --device cpu  # a 2-layer model: checks the script on a CPU

The model gets one real optimizer step first, so the checkpoint holds what a training run's does:
bf16 weights, float32 master weights and both Adam moments (about 14 bytes per parameter).
`GB/s` is bytes on disk (save) or tensor bytes read (load) over wall seconds, CUDA synchronised.
The first save of a Checkpointer also builds DCP's plan, so each measurement runs `--repeat` times.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _config(small: bool, root: Path, fmt: str, async_save: bool = False) -> Any:
    from viaduct.recipes import get_recipe
    from viaduct.testing import tiny_pretrain_config

    cfg = tiny_pretrain_config() if small else get_recipe("llama32_1b")()
    if cfg.model.vocab_size is None:  # pretrain() takes it from the tokenizer; Llama 3's has 128,256
        cfg.model.vocab_size = 256 if small else 128256
    cfg.checkpoint.save = str(root)
    cfg.checkpoint.load = str(root)
    cfg.checkpoint.ckpt_format = fmt
    cfg.checkpoint.async_save = async_save
    cfg.checkpoint.most_recent_k = 1  # keep the disk use of a 1B run at one checkpoint
    return cfg.validate(world_size=1)


def _build(cfg: Any, device: torch.device, small: bool) -> dict[str, Any]:
    """Model, optimizer (after one step: Adam state exists), scheduler and train state."""
    from viaduct.training.optim import build_optimizer
    from viaduct.training.scheduler import build_scheduler
    from viaduct.training.state import TrainState

    torch.manual_seed(0)
    dtype = torch.float32 if small else torch.bfloat16  # bf16 weights: the optimizer keeps fp32 masters
    model = cfg.model.provide().to(device=device, dtype=dtype)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg, optimizer)
    x = torch.randint(0, 256, (1, min(128, cfg.model.seq_length)), device=device)
    model(x, labels=torch.roll(x, -1, 1)).float().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, train_state=TrainState())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny model instead of Llama-3.2-1B")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--format", default="torch_dist", choices=["torch_dist", "torch"])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--log", action="store_true", help="print the checkpointer's own log lines (stderr)")
    args = parser.parse_args(argv)
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from viaduct.distributed.init import DistributedContext
    from viaduct.training.checkpointing import Checkpointer

    device = torch.device(args.device)
    base = Path(args.dir or tempfile.mkdtemp(prefix="viaduct-ckpt-bench-"))
    common = dict(model="small" if args.small else "llama32_1b", format=args.format, device=str(device))
    try:
        root = base / "sync"
        cfg = _config(args.small, root, args.format)
        objs = _build(cfg, device, args.small)
        params = sum(p.numel() for p in objs["model"].parameters())
        ckpt = Checkpointer(cfg, DistributedContext(device=device))
        for i in range(args.repeat):
            step = i + 1
            _sync(device)
            t0 = time.perf_counter()
            objs["train_state"].step = step
            path = Path(ckpt.save(step, **objs))
            seconds = time.perf_counter() - t0
            size = _disk_bytes(path)
            _emit(
                what="save",
                **common,
                params=params,
                repeat=i,
                bytes=size,
                seconds=round(seconds, 4),
                gb_per_s=round(size / 1e9 / seconds, 3),
            )
        ckpt.finalize()

        for i in range(args.repeat):
            loader = Checkpointer(cfg, DistributedContext(device=device))
            _sync(device)
            t0 = time.perf_counter()
            loader.load(**objs)
            _sync(device)
            seconds = time.perf_counter() - t0
            assert loader.last_load is not None
            meta = json.loads((Path(loader.last_load.path) / "metadata.json").read_text())
            size = int(meta["tensor_bytes"])
            _emit(
                what="load",
                **common,
                params=params,
                repeat=i,
                bytes=size,
                seconds=round(seconds, 4),
                gb_per_s=round(size / 1e9 / seconds, 3),
            )

        _bench_async(args, base, objs, common, params, device)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


def _bench_async(
    args: argparse.Namespace,
    base: Path,
    objs: dict[str, Any],
    common: dict[str, Any],
    params: int,
    device: torch.device,
) -> None:
    """The time save() blocks the caller with async_save, and how long the background write takes.

    Its staging memory is prepared first as the training loop prepares it (in the background after
    the first step); `async_prepare` reports how long that took and how much it slowed a GPU loop.
    """
    from viaduct.config import ConfigError
    from viaduct.distributed.init import DistributedContext
    from viaduct.training.checkpointing import Checkpointer

    root = base / "async"
    try:
        cfg = _config(args.small, root, args.format, async_save=True)
        ckpt = Checkpointer(cfg, DistributedContext(device=device))
    except ConfigError as exc:  # an older build refuses async_save
        _emit(what="async_save", **common, skipped=str(exc))
        return
    try:
        # As the training loop does after its first step: build the staging memory in the background,
        # while "training" (a matmul loop standing in for steps) goes on; measure how much it slows.
        baseline = _step_times(device, seconds=2.0)
        t0 = time.perf_counter()
        ckpt.prepare_staging(model=objs["model"], optimizer=objs["optimizer"])
        during = _step_times(device, seconds=1.0)
        ckpt._staging._join()
        _emit(
            what="async_prepare",
            **common,
            build_s=round(ckpt._staging.build_seconds or 0.0, 3),
            wall_s=round(time.perf_counter() - t0, 3),
            staged_gb=round(ckpt._staging.nbytes / 1e9, 3),
            pinned=ckpt._staging.pinned,
            step_ms_before=round(1e3 * sum(baseline) / len(baseline), 3),
            step_ms_during=round(1e3 * sum(during) / len(during), 3),
            step_ms_worst_during=round(1e3 * max(during), 3),
        )
        for i in range(args.repeat):
            _sync(device)
            t0 = time.perf_counter()
            ckpt.save(i + 1, **objs)
            blocked = time.perf_counter() - t0
            ckpt.wait_for_pending_save()
            total = time.perf_counter() - t0
            _emit(
                what="async_save",
                **common,
                params=params,
                repeat=i,
                blocked_s=round(blocked, 4),
                total_s=round(total, 4),
            )
        # Without preparation (the first save of a run that saves before its first step ends).
        ckpt._staging.release()
        _sync(device)
        t0 = time.perf_counter()
        ckpt.save(args.repeat + 1, **objs)
        _emit(what="async_save_unprepared", **common, blocked_s=round(time.perf_counter() - t0, 4))
    finally:
        ckpt.finalize()


def _step_times(device: torch.device, seconds: float) -> list[float]:
    """Durations of back-to-back matmuls (synchronised; 4096^3 in bf16 on a GPU) for about `seconds`."""
    n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    x = torch.randn(n, n, device=device, dtype=dtype)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        x @ x
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    main()
