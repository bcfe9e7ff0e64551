"""`TrainingRunError`: a run stopped for a reason the user can act on, not a bug in viaduct."""

from __future__ import annotations


class TrainingRunError(RuntimeError, ValueError):
    """A training run had to stop (a non-finite loss or gradient, replicas that drifted apart).

    `viaduct pretrain` / `finetune` print the message and exit 1 instead of showing a traceback. A
    `ValueError`, like every user-facing error of viaduct, and still the `RuntimeError` these errors
    always were, so existing `except RuntimeError` handlers keep working.
    """
