"""Checkpoint internals behind `viaduct.training.checkpointing.Checkpointer`.

* `layout`: directory names, the tracker file, crash-safe file writes, listing checkpoints, retention.
* `storage`: where the tensors go: torch.distributed.checkpoint ("torch_dist") or one torch.save file
  ("torch"); both read back in place, with `weights_only` loading only.
* `flat`: the flat {"model.<name>": t, "optimizer.<kind>.<name>": t} view of model and optimizer.
* `resolve`: which checkpoint the config asks to load; `restore`: key/shape checks and the optimizer.
* `errors`: `CheckpointError`, a `ConfigError` naming the field that asked for the checkpoint.

Users import `Checkpointer` from `viaduct.training.checkpointing`; these modules are the parts a later
version extends (background writes, resharding, an inspect command).
"""

from __future__ import annotations

from viaduct.training.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
