"""Checkpoint internals behind `viaduct.training.checkpointing.Checkpointer`.

* `layout`: directory names, the tracker file, crash-safe file writes, finding checkpoints, retention.
* `storage`: where the tensors go: torch.distributed.checkpoint ("torch_dist") or one torch.save file
  ("torch"); both read back in place, with `weights_only` loading only.
* `flat`: the flat {"model.<name>": t, "optimizer.<kind>.<name>": t} view of model and optimizer.

Users import `Checkpointer` from `viaduct.training.checkpointing`; these modules are the parts a later
version extends (background writes, resharding, an inspect command).
"""

from __future__ import annotations

from viaduct.training.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
