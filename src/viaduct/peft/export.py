"""What a PEFT run's adapter checkpoints turn into (`viaduct peft merge` / `export-adapter`):

* `merge_checkpoint(ckpt, out)`: the base with the adapters folded in, as a full viaduct checkpoint
  (step 0, weights only: fine-tune it further, generate with it, export it);
* `merge_checkpoint(ckpt, out, hf=True)`: the same as a Hugging Face model directory;
* `export_adapter(ckpt, out)`: the adapters alone in the Hugging Face PEFT layout
  (`adapter_config.json`, `adapter_model.safetensors`), for the Hugging Face model of the same base.

Each reads the checkpoint as generation does (`viaduct.inference.load_checkpoint`: the base the run
named, then its adapters; no code runs), in this one process on the CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from viaduct.config import ConfigError, Problem
from viaduct.training.checkpoint import layout

log = logging.getLogger("viaduct")


def _refuse_existing(out: Path, what: str) -> None:
    if layout.list_checkpoints(out) or layout.is_checkpoint_dir(out) or (out / "config.json").exists():
        raise ConfigError(
            Problem(
                "out_dir",
                f"already holds a model; {what} never overwrites one",
                str(out),
                fix="choose an empty or new directory",
            ),
            header=what,
        )


def _adapter_config_of(ckpt: Path) -> tuple[Path, object]:
    """The checkpoint directory and its run's PEFT config (a `ConfigError` when it has none)."""
    from viaduct.inference.load import find_checkpoint_directory
    from viaduct.training.checkpoint.config_check import load_saved_config

    directory = find_checkpoint_directory(ckpt)
    cfg = load_saved_config(directory / layout.RUN_CONFIG)
    if cfg.peft is None:
        raise ConfigError(
            Problem(
                "ckpt_dir",
                "is not a PEFT adapter checkpoint (its run trained the whole model)",
                str(directory),
                fix="use viaduct checkpoint export-hf for a full checkpoint",
            ),
            header="peft",
        )
    return directory, cfg.peft


def merge_checkpoint(
    ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, hf: bool = False
) -> Path:
    """Fold the adapters of the PEFT checkpoint `ckpt` into its base and write the merged model to
    `out_dir`: a viaduct checkpoint (returns its iter_0000000 directory) or, with `hf`, a Hugging
    Face model directory (returns it)."""
    from viaduct.distributed.init import DistributedContext
    from viaduct.inference.load import load_checkpoint
    from viaduct.training.checkpoint.checkpointer import Checkpointer
    from viaduct.training.state import TrainState

    _adapter_config_of(Path(ckpt))
    out = Path(out_dir).expanduser()
    _refuse_existing(out, "peft merge")
    if hf:
        from viaduct.training.checkpoint.hf import export_hf_checkpoint

        return export_hf_checkpoint(ckpt, out)  # loads merged, as below
    loaded = load_checkpoint(Path(ckpt), device="cpu")  # base + adapters, merged
    cfg = loaded.config
    cfg.peft = None
    ck = cfg.checkpoint
    ck.save, ck.load, ck.pretrained_checkpoint, ck.finetune = str(out), None, None, False
    ck.async_save = ck.also_save_hf_checkpoint = False
    cfg.logger.tensorboard_dir = None
    cfg.validate(world_size=1)
    saved = Checkpointer(cfg, DistributedContext()).save(
        0, model=loaded.model, optimizer=None, scheduler=None, train_state=TrainState()
    )
    log.info("merged the adapters of %s into %s", loaded.directory, saved)
    return Path(saved)


def export_adapter(
    ckpt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapters of the PEFT checkpoint `ckpt` as a Hugging Face PEFT adapter directory
    (`base_model_name_or_path`, default the run's base checkpoint, goes into adapter_config.json)."""
    from viaduct.inference.load import build_adapted_model

    directory, peft = _adapter_config_of(Path(ckpt))
    out = Path(out_dir).expanduser()
    model, cfg = build_adapted_model(directory)
    base = base_model_name_or_path or cfg.checkpoint.pretrained_checkpoint
    peft.save_hf_adapter(model, out, base_model_name_or_path=base)  # type: ignore[attr-defined]
    log.info("wrote the adapters of %s to %s", directory, out)
    return out
