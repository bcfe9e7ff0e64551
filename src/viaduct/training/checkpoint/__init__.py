"""Training checkpoints: `Checkpointer` and the parts it is made of.

* `checkpointer`: `Checkpointer(cfg, ctx)`, which saves and loads as `cfg.checkpoint` says (users
  import it from `viaduct.training.checkpointing`).
* `layout`: directory names, the tracker file, crash-safe file writes, listing checkpoints, which
  checkpoints retention lets go.
* `save_guard`: what stops a save (non-finite weights, checked before any file is written; a full
  disk; a foreign writer), told as one `CheckpointSaveError` line.
* `rank0_files`: the files rank 0 alone writes (``common.pt``, ``train_state.pt``, the run's config,
  the tokenizer's files and, last, ``metadata.json``).
* `retention`: after each committed save, removes leftovers and the checkpoints `most_recent_k` lets
  go (renamed at once, deleted in the background).
* `storage`: where the tensors go: torch.distributed.checkpoint ("torch_dist") or one torch.save file
  ("torch"); both read back in place, with `weights_only` loading only.
* `dcp_index`: reads torch.distributed.checkpoint's index through an allowlist unpickler, so opening
  a checkpoint never runs code.
* `flat`: the flat {"model.<name>": t, "optimizer.<kind>.<name>": t} view of model and optimizer.
* `staging`: the host-memory arena tensors are copied into before they are written.
* `async_writer`: the background thread of `checkpoint.async_save` and the snapshot of non-tensor state.
* `resolve`: which checkpoint the config asks to load; `restore`: key/shape checks and the optimizer.
* `config_check`: compares a checkpoint's saved configuration with the one resuming from it.
* `lock`: one run at a time per save directory.
* `inspect`: describes a checkpoint without building a model (`viaduct checkpoint inspect`).
* `upgrade`: converts what older checkpoint versions stored differently (the fused weights' rows).
* `errors`: `CheckpointError`, a `ConfigError` naming the field that asked for the checkpoint, and
  `CheckpointSaveError`.
"""

from __future__ import annotations

from viaduct.training.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
