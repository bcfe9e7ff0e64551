"""The files rank 0 alone writes into a checkpoint: ``common.pt``, ``train_state.pt``,
``run_config.yaml``, ``tokenizer/`` (the tokenizer's local files) and, last, ``metadata.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from viaduct.training.checkpoint import layout

if TYPE_CHECKING:
    from viaduct.distributed.layout import ParallelLayout
    from viaduct.training.config.checkpoint import CheckpointConfig
    from viaduct.training.config.tokenizer import TokenizerConfig

__all__ = ["copy_tokenizer_assets", "layout_record", "write_rank0_files"]

# Files of a Hugging Face / SentencePiece / tiktoken tokenizer directory worth keeping with the weights
# (a tokenizer_model directory may also hold the model's weights, which must not be copied).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)


def write_rank0_files(
    directory: Path,
    *,
    ckpt: CheckpointConfig,
    tokenizer: TokenizerConfig | None,
    world_size: int,
    step: int,
    common: dict[str, Any],
    train_state: dict[str, Any],
    run_config: str,
    size: int,
    optim: bool,
    parallel: ParallelLayout | None = None,
    adapters_of: str | None = None,
) -> None:
    """Write rank 0's files of the save of `step` into `directory` (its ``.tmp`` directory), metadata
    last: `size` is the checkpoint's tensor bytes, `optim` whether it holds the optimizer state,
    `parallel` the parallel layout that saved it (for `viaduct checkpoint inspect` and the resume
    report; any layout can load it); `adapters_of`: the base checkpoint of a PEFT run's adapter-only
    checkpoint (contents "model": "adapters")."""
    layout.save_file(common, directory / layout.COMMON)
    layout.save_file(train_state, directory / layout.TRAIN_STATE)
    layout.write_text(directory / layout.RUN_CONFIG, run_config)
    copied = copy_tokenizer_assets(tokenizer, directory) if ckpt.save_tokenizer_assets else False
    meta = {
        "checkpoint_version": layout.CHECKPOINT_VERSION,
        "format": ckpt.ckpt_format,
        "step": int(step),
        "world_size": world_size,
        "contents": {
            "model": "adapters" if adapters_of is not None else True,
            "optimizer": optim,
            "rng": ckpt.save_rng,
            "tokenizer": copied,
        },
        **({"peft_base": adapters_of} if adapters_of is not None else {}),
        "tensor_bytes": size,
        **({"parallel_layout": layout_record(parallel)} if parallel is not None else {}),
        "torch_version": torch.__version__,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last by rank 0: its presence marks a directory as a checkpoint (see is_checkpoint_dir).
    layout.write_text(directory / layout.METADATA, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def layout_record(parallel: ParallelLayout) -> dict[str, Any]:
    """The parallel layout as metadata.json keeps it: its one-line description and its sizes."""
    return {"describe": parallel.describe(), **dataclasses.asdict(parallel)}


def copy_tokenizer_assets(tok: TokenizerConfig | None, directory: Path) -> bool:
    """Copy the tokenizer's local files into `directory/tokenizer/`; False when there are none
    (byte-level / null tokenizers, or a Hugging Face hub id that is not on this disk)."""
    sources: list[Path] = []
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        value = getattr(tok, name, None)
        if not value:
            continue
        src = Path(value).expanduser()
        if src.is_file():
            sources.append(src)
        elif src.is_dir():
            sources += [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]
    if not sources:
        return False
    dest = directory / layout.TOKENIZER_DIR
    dest.mkdir(exist_ok=True)
    for src in sources:
        shutil.copy2(src, dest / src.name)
    return True


def with_saved_tokenizer_files(tok: TokenizerConfig, directory: Path) -> list[str]:
    """Point `tok`'s local files that are gone at the copies in the checkpoint `directory`'s
    `tokenizer/` (see `copy_tokenizer_assets`), in place; returns the fields it changed."""
    saved = directory / layout.TOKENIZER_DIR
    changed: list[str] = []
    if not saved.is_dir():
        return changed
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        value = getattr(tok, name, None)
        if not value or value.startswith("builtin:") or Path(value).expanduser().exists():
            continue
        copy = saved / Path(value).name
        if copy.is_file():
            setattr(tok, name, str(copy))
        elif name == "tokenizer_model" and tok.tokenizer_type == "HuggingFaceTokenizer":
            setattr(tok, name, str(saved))  # a directory's files were copied flat
        else:
            continue
        changed.append(name)
    return changed
