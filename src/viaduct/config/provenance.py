"""Who set each configuration value: the default, Python code, a YAML file, the CLI, or validate().

Every config object keeps a small `{field: source}` map. Loaders wrap their assignments in
`with setting_source("file a.yaml:3"):`; plain Python assignments are traced to the calling
file and line. `validate()` marks what it derives with a "derived" source, which is how it can
recompute derived values from scratch on the next call.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import FrameType

DEFAULT = "default"
DERIVED_PREFIX = "derived"

_stack: list[str] = []
_this_dir = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def setting_source(source: str) -> Iterator[None]:
    """Attribute every assignment made inside the block to `source`."""
    _stack.append(source)
    try:
        yield
    finally:
        _stack.pop()


def current_source() -> str:
    """The active source, or the first Python frame outside the config machinery."""
    if _stack:
        return _stack[-1]
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        # dataclass-generated __init__ methods live in "<string>"; skip them and our own code.
        if filename.startswith("<") or filename.startswith(_this_dir):
            frame = frame.f_back
            continue
        return f"python {_short_path(filename)}:{frame.f_lineno}"
    return "python"


def is_derived(source: str | None) -> bool:
    return source is not None and source.startswith(DERIVED_PREFIX)


def is_user_set(source: str | None) -> bool:
    """Set explicitly by the user (not a default, not derived)."""
    return source is not None and source not in ("", DEFAULT) and not source.startswith(DERIVED_PREFIX)


def _short_path(filename: str) -> str:
    marker = os.sep + "viaduct" + os.sep
    if marker in filename:
        return "viaduct" + os.sep + filename.rsplit(marker, 1)[1]
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        rel = filename
    return rel if not rel.startswith("..") else filename
