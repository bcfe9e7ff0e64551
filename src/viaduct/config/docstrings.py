"""Attribute docstrings of config dataclasses (the string literal right below each field).

They are the help text of CLI flags and the descriptions of the JSON Schema. Read from the source
on demand (never at import time) and cached per class.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import textwrap


@functools.cache
def _own_docstrings(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    out: dict[str, str] = {}
    body = node.body
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[stmt.target.id] = " ".join(nxt.value.value.split())
    return out


def field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> docstring, for `cls` and its bases (a subclass's text wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        out.update(_own_docstrings(klass))
    return out


def class_summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().split("\n\n", 1)[0].replace("\n", " ")
