"""Describe a checkpoint without building a model: `inspect_checkpoint(path)` and `format_inspection`.

Reads only metadata: ``metadata.json``, ``train_state.pt``, ``run_config.yaml`` and the tensor index
(torch.distributed.checkpoint's ``.metadata`` through the allowlist unpickler of `dcp_index`, or the
memory-mapped ``model_optim.pt``), every ``.pt`` file with ``weights_only`` unpickling. DCP shard
files are checked against the index by size, so a truncated ``.distcp`` is reported without reading
its data. Every problem is a `ConfigError` naming the file.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from viaduct.config import ConfigError, Problem
from viaduct.training.checkpoint import layout as L
from viaduct.training.checkpoint.dcp_index import CheckpointIndexError
from viaduct.training.checkpoint.errors import cause_text
from viaduct.training.checkpoint.safe_load import load_weights_only

__all__ = ["find_checkpoint_dir", "format_inspection", "inspect_checkpoint"]

_FIELD = "path"


def _error(
    message: str, path: Path | str, fix: str | None = None, cause: BaseException | None = None
) -> ConfigError:
    text = f"{message} ({path})"
    if cause is not None:
        text += f": {cause_text(cause)}"
    return ConfigError(Problem(_FIELD, text, fix=fix), header="cannot inspect the checkpoint")


def find_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint `path` designates: itself (one ``iter_N``), or the tracker's / newest under a root."""
    from viaduct.training.checkpoint.resolve import find_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise _error("no such file or directory", p)
    if not p.is_dir():
        raise _error("not a checkpoint directory", p, fix="give a checkpoint root or one iter_N directory")
    found = find_checkpoint(p, _FIELD, None, verbose=False)  # CheckpointError (a ConfigError) when broken
    if found is None:
        raise _error(
            "not a checkpoint: no metadata.json/.metadata/model_optim.pt, no tracker and no iter_N directory",
            p,
            fix="give a checkpoint root (holding latest_checkpointed_iteration.txt) or one iter_N directory",
        )
    return found


def _read_pt(path: Path) -> Any:
    if not path.is_file():
        raise _error(f"{path.name} is missing", path)
    try:
        return load_weights_only(path)
    except Exception as exc:  # truncated, garbage, or objects weights_only refuses
        raise _error(f"{path.name} is corrupt or unreadable", path, cause=exc) from exc


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dcp_tensors(directory: Path) -> list[dict[str, Any]]:
    from viaduct.training.checkpoint.storage import DcpStorage

    # The same reading as a load: the index through the allowlist unpickler, every shard checked
    # against it by size (a truncated .distcp is named without reading its data).
    try:
        info = DcpStorage(rank=0, world_size=1).describe(directory)
    except CheckpointIndexError as exc:
        raise _error(exc.reason, exc.path) from exc
    return [_row(key, t.shape, t.dtype) for key, t in info.items()]


def _torch_tensors(directory: Path) -> list[dict[str, Any]]:
    path = directory / L.TORCH_TENSORS
    if not path.is_file():
        raise _error(f"{L.TORCH_TENSORS} is missing", path)
    try:
        data = load_weights_only(path, mmap=True)
    except Exception as exc:
        raise _error(f"{L.TORCH_TENSORS} is corrupt or truncated", path, cause=exc) from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise _error(f"{L.TORCH_TENSORS} is not a flat dict of tensors", path)
    return [_row(k, tuple(v.shape), v.dtype) for k, v in data.items()]


def _row(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {
        "name": name,
        "shape": list(shape),
        "dtype": _dtype_name(dtype),
        "numel": numel,
        "bytes": numel * itemsize,
    }


def _config_summary(path: Path) -> dict[str, Any]:
    """Model shape, parameter count (from the config), batch sizes and lr; an "error" key when unreadable."""
    from viaduct.training.checkpoint.config_check import load_saved_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = load_saved_config(path)
    except ConfigError as exc:  # an unsafe or broken run_config.yaml: reported, never run
        return {"error": str(exc)}
    m, t, o = cfg.model, cfg.train, cfg.optimizer
    summary: dict[str, Any] = {
        "model": type(m).__name__,
        **{
            k: getattr(m, k, None)
            for k in (
                "num_layers",
                "hidden_size",
                "ffn_hidden_size",
                "num_attention_heads",
                "num_query_groups",
                "vocab_size",
                "seq_length",
                "normalization",
                "position_embedding_type",
            )
        },
        "params_dtype": str(getattr(m, "params_dtype", "")),
        "global_batch_size": t.global_batch_size,
        "micro_batch_size": t.micro_batch_size,
        "train_iters": t.train_iters,
        "optimizer": getattr(o, "optimizer", None),
        "lr": getattr(o, "lr", None),
        "min_lr": getattr(o, "min_lr", None),
        "tokenizer_type": str(getattr(cfg.tokenizer, "tokenizer_type", None)),
    }
    return summary


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything `viaduct checkpoint inspect` shows, as JSON-able data; `ConfigError` when broken."""
    directory = find_checkpoint_dir(path)
    meta_path = directory / L.METADATA
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise _error(f"{L.METADATA} is corrupt", meta_path, cause=exc) from exc
        if not isinstance(meta, dict):
            raise _error(f"{L.METADATA} is not a JSON object", meta_path)
    else:
        meta = L.metadata_of(directory)
    fmt = meta.get("format", "torch_dist")
    if fmt == "torch_dist":
        tensors = _dcp_tensors(directory)
    elif fmt == "torch":
        tensors = _torch_tensors(directory)
    else:
        raise _error(f"unknown checkpoint format {fmt!r} in {L.METADATA}", meta_path)

    state: dict[str, Any] = {}
    if (directory / L.TRAIN_STATE).exists():
        raw = _read_pt(directory / L.TRAIN_STATE)
        if not isinstance(raw, dict):
            raise _error(f"{L.TRAIN_STATE} is not a dict", directory / L.TRAIN_STATE)
        state = {
            k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in raw.items()
        }

    model_rows = [r for r in tensors if r["name"].startswith("model.")]
    total = sum(r["bytes"] for r in tensors)
    config_path = directory / L.RUN_CONFIG
    return {
        "path": str(directory),
        "format": fmt,
        # Absent in checkpoints written before versions were recorded, which are version 1.
        "checkpoint_version": meta.get("checkpoint_version", 1),
        "step": state.get("step", meta.get("step")),
        "consumed_train_samples": state.get("consumed_train_samples"),
        "floating_point_operations_so_far": state.get("floating_point_operations_so_far"),
        "world_size": meta.get("world_size"),
        "parallel_layout": meta.get("parallel_layout"),
        "contents": meta.get("contents", {}),
        "saved_at": meta.get("saved_at"),
        "torch_version": meta.get("torch_version"),
        "config": _config_summary(config_path) if config_path.is_file() else {"error": "no run_config.yaml"},
        "parameters": sum(r["numel"] for r in model_rows),
        "tensors": sorted(tensors, key=lambda r: r["name"]),
        "totals_mb": {
            "model": sum(r["bytes"] for r in model_rows) / 2**20,
            "optimizer": sum(r["bytes"] for r in tensors if r["name"].startswith("optimizer.")) / 2**20,
            "all": total / 2**20,
        },
    }


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_checkpoint`'s result."""
    lines = [f"checkpoint {info['path']}"]
    flops = info.get("floating_point_operations_so_far")
    lines.append(
        f"  format {info['format']}, step {info['step']}, consumed samples {info['consumed_train_samples']}, "
        f"FLOPs {flops:.4g}"
        if isinstance(flops, (int, float))
        else f"  format {info['format']}, step {info['step']}"
    )
    contents = ", ".join(k for k, v in sorted(info.get("contents", {}).items()) if v)
    lines.append(f"  saved by {info.get('world_size')} rank(s) at {info.get('saved_at')}; holds: {contents}")
    parallel = info.get("parallel_layout")
    if isinstance(parallel, dict) and isinstance(parallel.get("describe"), str):
        lines.append(f"  parallel layout: {parallel['describe']} (any layout can load it)")
    version = info.get("checkpoint_version")
    if version is not None:
        note = ""
        if version == 1:
            note = " (older row layout of the fused weights: converted when loaded)"
        elif isinstance(version, int) and version > L.CHECKPOINT_VERSION:
            note = f" (newer than this viaduct reads: up to {L.CHECKPOINT_VERSION})"
        lines.append(f"  checkpoint version {version}{note}")
    cfg = info["config"]
    if "error" in cfg:
        lines.append(f"  config: unreadable: {cfg['error']}")
    else:
        lines.append(
            f"  model {cfg['model']}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
            f"ffn {cfg['ffn_hidden_size']}, heads {cfg['num_attention_heads']} "
            f"(query groups {cfg['num_query_groups']}), vocab {cfg['vocab_size']}, seq {cfg['seq_length']}, "
            f"{cfg['params_dtype']}"
        )
        lines.append(
            f"  batch: global {cfg['global_batch_size']}, micro {cfg['micro_batch_size']}; "
            f"train_iters {cfg['train_iters']}; {cfg['optimizer']} lr {cfg['lr']} (min {cfg['min_lr']}); "
            f"tokenizer {cfg['tokenizer_type']}"
        )
    lines.append(f"  parameters: {info['parameters']:,} (from the saved model tensors)")
    rows = info["tensors"]
    width = max([len(r["name"]) for r in rows] + [4])
    lines.append("")
    lines.append(f"  {'name':<{width}}  {'shape':<20} {'dtype':<9} {'MB':>10}")
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) or "scalar"
        lines.append(f"  {r['name']:<{width}}  {shape:<20} {r['dtype']:<9} {r['bytes'] / 2**20:>10.3f}")
    t = info["totals_mb"]
    lines.append("")
    lines.append(
        f"  total: {len(rows)} tensors, {t['all']:.3f} MB "
        f"(model {t['model']:.3f} MB, optimizer {t['optimizer']:.3f} MB)"
    )
    return "\n".join(lines) + "\n"
