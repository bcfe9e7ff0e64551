"""Hugging Face model directories to viaduct checkpoints and back (`viaduct checkpoint import-hf` /
`export-hf`, `AutoBridge.import_ckpt` / `export_ckpt`).

An imported checkpoint is an ordinary viaduct checkpoint of step 0: weights, no optimizer state, and a
`run_config.yaml` whose model is the mapped provider and whose tokenizer is the directory's (when it
has tokenizer files). `checkpoint.pretrained_checkpoint` starts a run from it (or from the Hugging
Face directory itself). Export reads a checkpoint's weights in one process and writes a Hugging Face
directory (config.json, safetensors shards with their index, tokenizer files).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from viaduct.config import ConfigError, Problem
from viaduct.distributed.init import DistributedContext
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.training.checkpoint import layout
from viaduct.training.checkpoint.checkpointer import Checkpointer
from viaduct.training.state import TrainState

if TYPE_CHECKING:
    from viaduct.models.conversion import AutoBridge

log = logging.getLogger("viaduct")

HF_COPY = "hf"
"""The subdirectory of a checkpoint that checkpoint.also_save_hf_checkpoint writes."""

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model")
"""Either of these makes a Hugging Face directory carry its tokenizer."""


def import_hf_checkpoint(
    hf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert the Hugging Face model at `hf_path` (a directory, or a Hub id) into a viaduct checkpoint
    under `out_dir`; returns the checkpoint's directory (`out_dir/iter_0000000`).

    The model is built and filled in this process on the CPU: it needs the model's size in memory,
    plus one tensor at a time for the conversion.
    """
    from viaduct.models.conversion import AutoBridge
    from viaduct.recipes import get_recipe
    from viaduct.training.config.tokenizer import TokenizerConfig

    out = Path(out_dir).expanduser()
    if layout.list_checkpoints(out) or layout.is_checkpoint_dir(out):
        raise ConfigError(
            Problem(
                "out_dir",
                "already holds a checkpoint; an import never overwrites one",
                str(out),
                fix="choose an empty or new directory",
            ),
            header="import-hf",
        )
    bridge = AutoBridge.from_hf_pretrained(hf_path, torch_dtype)
    provider = bridge.to_megatron_provider(load_weights=True)
    model = provider.provide(device="cpu")
    cfg = get_recipe("default")()
    cfg.model = provider
    source = bridge.hf_path
    if source is not None and any((source / name).is_file() for name in _TOKENIZER_MARKERS):
        cfg.tokenizer = TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(source))
    else:
        vocab = provider.vocab_size
        cfg.tokenizer = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=vocab)
    cfg.checkpoint.save = str(out)
    cfg.checkpoint.load = None
    cfg.checkpoint.async_save = False
    cfg.logger.tensorboard_dir = None
    cfg.validate(world_size=1)
    saved = Checkpointer(cfg, DistributedContext()).save(
        0, model=model, optimizer=None, scheduler=None, train_state=TrainState()
    )
    log.info("imported %s (%s) into %s", hf_path, bridge.architecture, saved)
    return Path(saved)


def export_hf_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int = 5 * 2**30,
    bridge: AutoBridge | None = None,
) -> Path:
    """Write the weights of the viaduct checkpoint `ckpt_dir` (a root: its latest; or one iter_N
    directory) as a Hugging Face model directory `out_dir`; returns it.

    The Hugging Face config is the source model's when the run started from a Hugging Face directory
    that is still there (`model.hf_model_id`), else the one `provider_config` maps the model to; or
    `bridge`'s. The tokenizer files come from the run's Hugging Face tokenizer when it had one.
    """
    from viaduct.inference.load import load_checkpoint
    from viaduct.models.conversion.auto_bridge import TOKENIZER_FILES

    loaded = load_checkpoint(Path(ckpt_dir), device="cpu")
    bridge = bridge or bridge_for(loaded.config.model)
    out = Path(out_dir).expanduser()
    bridge.save_hf_pretrained(loaded.model, out, max_shard_size=max_shard_size)
    tokenizer = loaded.config.tokenizer
    if bridge.hf_path is None and tokenizer.tokenizer_type == "HuggingFaceTokenizer":
        model_dir = Path(str(tokenizer.tokenizer_model)).expanduser()
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, out / name)
    log.info("exported %s (%s) to %s", loaded.directory, bridge.architecture, out)
    return out


def bridge_for(provider: object) -> AutoBridge:
    """The bridge that exports `provider`'s model: the Hugging Face model it came from when that
    directory is still there (`model.hf_model_id`: its config and tokenizer files), else the config
    `provider_config` maps it to."""
    from viaduct.models.conversion import AutoBridge
    from viaduct.models.conversion.provider_config import hf_config_from_provider
    from viaduct.training.config.checkpoint import is_hf_model_dir

    if not isinstance(provider, GPTModelProvider):
        raise ConfigError(
            Problem(
                "model",
                "only GPT-family models export to Hugging Face",
                type(provider).__name__,
                fix="export the checkpoint of a GPT-family model",
            )
        )
    source = provider.hf_model_id
    if source is not None and is_hf_model_dir(source):
        return AutoBridge.from_hf_pretrained(source)
    return AutoBridge.from_hf_config(hf_config_from_provider(provider))
