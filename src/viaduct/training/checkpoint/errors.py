"""`CheckpointError`: a requested checkpoint that is missing, incomplete or unreadable; `cause_text`."""

from __future__ import annotations

import errno

from viaduct.config import ConfigError, Problem


class CheckpointError(ConfigError):
    """A checkpoint the configuration asks for cannot be used.

    A `ConfigError` (and so a `ValueError`): its problems name the config field that requested the
    checkpoint (`checkpoint.load`, `checkpoint.ckpt_step`, `checkpoint.pretrained_checkpoint`) and
    the path on disk, so the user knows which setting to fix.
    """


class CheckpointSaveError(ConfigError):
    """A checkpoint could not be saved (disk full, non-finite weights, another writer): nothing was
    committed, and the tracker still names the last good checkpoint."""

    os_error: OSError | None = None
    """The file-system error behind it (a full disk), when there is one."""


def _one_line(exc: BaseException, limit: int) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}{where}"
    elif isinstance(exc, EOFError) and not str(exc):
        text = "EOFError: the data ends early (a truncated file)"
    else:
        detail = " ".join(str(exc).split())
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cause_text(exc: BaseException, limit: int = 300) -> str:
    """The cause of a checkpoint read or write error in one line, without a traceback.

    torch.distributed.checkpoint wraps each rank's error in a `CheckpointException` whose text is a
    whole formatted traceback per rank; this names each rank's own error instead ("rank 0:
    EOFError: ..."), ranks with the same error together.
    """
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        by_text: dict[str, list[str]] = {}
        for rank, failure in sorted(failures.items()):
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            text = cause_text(inner, limit) if isinstance(inner, BaseException) else str(inner)
            by_text.setdefault(text, []).append(str(rank))
        return "; ".join(f"rank {','.join(ranks)}: {text}" for text, ranks in by_text.items())
    return _one_line(exc, limit)


def root_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, a rank's error inside a DCP `CheckpointException`, or a
    cause in its chain (None when there is none)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(inner, BaseException):
                    todo.append(inner)
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                todo.append(nxt)
    return None


def checkpoint_problem(
    field: str, message: str, path: object, fix: str | None = None, cause: BaseException | None = None
) -> CheckpointError:
    """One-problem `CheckpointError` about `path`, requested by config field `field`.

    The path goes into the message in full (a Problem's value is shortened for display); `cause`
    adds the underlying error in one line (`cause_text`).
    """
    text = f"{message} ({path})"
    if cause is not None:
        text += f": {cause_text(cause)}"
    return CheckpointError(Problem(field, text, fix=fix), header="cannot load the checkpoint")
