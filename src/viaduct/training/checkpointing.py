"""Saving and loading training checkpoints: `Checkpointer(cfg, ctx)`.

The import path users know; the code lives in `viaduct.training.checkpoint.checkpointer`, beside the
parts it is made of (see the `viaduct.training.checkpoint` package).
"""

from __future__ import annotations

from viaduct.training.checkpoint.checkpointer import (
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    LoadReport,
)

__all__ = ["CheckpointError", "CheckpointSaveError", "Checkpointer", "LoadReport"]
