"""`CheckpointError`: a requested checkpoint that is missing, incomplete or unreadable."""

from __future__ import annotations

from viaduct.config import ConfigError, Problem


class CheckpointError(ConfigError):
    """A checkpoint the configuration asks for cannot be used.

    A `ConfigError` (and so a `ValueError`): its problems name the config field that requested the
    checkpoint (`checkpoint.load`, `checkpoint.ckpt_step`, `checkpoint.pretrained_checkpoint`) and
    the path on disk, so the user knows which setting to fix.
    """


def checkpoint_problem(
    field: str, message: str, path: object, fix: str | None = None, cause: BaseException | None = None
) -> CheckpointError:
    """One-problem `CheckpointError` about `path`, requested by config field `field`.

    The path goes into the message in full (a Problem's value is shortened for display); `cause`
    adds the first lines of the underlying error.
    """
    text = f"{message} ({path})"
    if cause is not None:
        detail = " ".join(str(cause).split())
        text += f": {type(cause).__name__}: {detail[:300]}{'...' if len(detail) > 300 else ''}"
    return CheckpointError(Problem(field, text, fix=fix), header="cannot load the checkpoint")
