"""YAML reading and writing: libyaml when present, line numbers for messages and provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from viaduct.config.errors import ConfigError, ConfigFileNotFoundError, Problem

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_yaml(data: Any) -> str:
    """Block-style YAML keeping the key order (`_target_` first, then fields in declaration order)."""
    return yaml.dump(
        _escape_interpolations(data),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def _escape_interpolations(data: Any) -> Any:
    """A text value holding a literal `${` is written `\\${`: read back, it must not be a reference."""
    if isinstance(data, str):
        return data.replace("${", "\\${") if "${" in data else data
    if isinstance(data, list):
        return [_escape_interpolations(v) for v in data]
    if isinstance(data, dict):
        return {k: _escape_interpolations(v) for k, v in data.items()}
    return data


def _scalar_yaml(value: Any) -> str:
    text = yaml.dump(
        _escape_interpolations(value),
        Dumper=_Dumper,
        default_flow_style=True,
        allow_unicode=True,
        width=10_000,
        sort_keys=False,
    )
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def dump_yaml_with_comments(
    data: dict[str, Any], comments: dict[str, str], prefix: str = "", indent: int = 0
) -> str:
    """Like `dump_yaml`, with `# comment` after each value whose dotted path is in `comments`."""
    lines: list[str] = []
    pad = " " * indent
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        note = comments.get(path)
        suffix = f"  # {note}" if note else ""
        k = _scalar_yaml(key)
        if isinstance(value, dict) and value and "_target_" in value and not _is_leaf_object(value):
            lines.append(f"{pad}{k}:{suffix}")
            lines.append(dump_yaml_with_comments(value, comments, path, indent + 2).rstrip("\n"))
        else:
            lines.append(f"{pad}{k}: {_scalar_yaml(value)}{suffix}")
    return "\n".join(line for line in lines if line) + "\n"


def _is_leaf_object(value: dict[str, Any]) -> bool:
    """dtype / function / enum mappings are shown inline: they are one value, not a component."""
    return "_call_" in value or "_partial_" in value


def _lines_of(node: Any, prefix: str, out: dict[str, int], problems: list[Problem], source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            if key in seen:
                problems.append(
                    Problem(
                        path,
                        "key appears twice",
                        fix="keep one",
                        source=f"{source}:{key_node.start_mark.line + 1}",
                    )
                )
            seen.add(key)
            out[path] = key_node.start_mark.line + 1
            _lines_of(value_node, path, out, problems, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + 1
            _lines_of(item, path, out, problems, source)


MAX_FILE_BYTES = 8 * 1024 * 1024
"""The largest configuration file read: a full configuration is tens of kilobytes."""
ALIAS_ALLOWANCE = 200_000
"""How much anchors and aliases may add to a document, in values plus characters of text.

An alias shares the value of its anchor, so nine lines of nine aliases each (the "billion laughs"
document, 342 bytes) stand for 9^9 strings: harmless as parsed, but every step after parsing
(line numbers, merging, saving) walks the expanded tree. A document may expand to twice its own
size (what a document without aliases does at most) plus this much.
"""
MAX_DEPTH = 100
"""The deepest nesting of lists and mappings read (a configuration nests about five deep)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, text_length: int, source: str) -> None:
    """Refuse a node graph whose aliases expand it past `ALIAS_ALLOWANCE`, loop, or nest too deep.

    Sizes are counted once per distinct node (memoized), never by expanding: linear in the
    document, whatever it would expand to.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    order: list[yaml.Node] = []  # post-order: a node after everything inside it
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if isinstance(node, yaml.ScalarNode):
                size[key] += len(node.value)
            if depth[key] > MAX_DEPTH:
                raise _refuse(node, source, f"the document nests deeper than {MAX_DEPTH} levels")
            order.append(node)
            continue
        if key in size:
            continue
        if key in open_:
            raise _refuse(
                node, source, "a YAML alias refers to a value that contains it (a recursive anchor)"
            )
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)
    limit = 2 * text_length + ALIAS_ALLOWANCE
    if size[id(root)] > limit:
        # Name the innermost value that is already too big: the anchor the aliases multiply.
        culprit = next(n for n in order if size[id(n)] > limit)
        raise _refuse(
            culprit,
            source,
            f"YAML anchors and aliases expand this value to more than {limit:,} values and characters "
            f"(the document is {text_length:,} characters)",
            fix="write the repeated values out, or repeat them fewer times",
        )


def _refuse(node: yaml.Node, source: str, message: str, fix: str | None = None) -> ConfigError:
    where = f"{source}:{node.start_mark.line + 1}"
    return ConfigError(Problem("", message, fix=fix or "correct the YAML at that line", source=where))


def _load(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of a YAML document, read within the limits above."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(
            Problem(
                "",
                f"the YAML text is {len(text):,} characters; at most {MAX_FILE_BYTES:,} are read",
                fix="a configuration is far smaller: check that this is the right file",
                source=source,
            )
        )
    loader = _Loader(text)
    try:
        # Compose once, check the node graph, then construct from that same graph: nothing is
        # built from a document that has not passed the checks.
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node, len(text), source)
        return loader.construct_document(node), node
    except RecursionError:  # the pure-Python composer on a deeply nested document
        raise ConfigError(
            Problem("", f"the document nests deeper than {MAX_DEPTH} levels", source=source)
        ) from None
    finally:
        loader.dispose()


def load_yaml_value(text: str, source: str) -> Any:
    """One YAML value (an override's right-hand side) within the file limits.

    Raises `yaml.YAMLError` for text that is not YAML (the caller keeps it as a string) and
    `ConfigError` for YAML that is refused.
    """
    return _load(text, source)[0]


def parse_yaml_text(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """(data, {dotted path: line}) for YAML text; syntax errors become a `ConfigError` at file:line.

    `${...}` values are returned as written: they are resolved after merging
    (`viaduct.config.interpolation`), when every value they may refer to is known.
    """
    try:
        data, node = _load(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        raise ConfigError(Problem("", message, fix="correct the YAML at that line", source=where)) from None
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _lines_of(node, "", lines, problems, source)
    if problems:
        raise ConfigError(problems, header=f"cannot read {source}")
    return data, lines


def load_yaml_file(path: str | Path) -> tuple[Any, dict[str, int]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigFileNotFoundError(
            Problem(
                "",
                "config file not found",
                str(p),
                fix="check the path (relative paths start at the current directory)",
            )
        )
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                Problem(
                    "",
                    f"the file is {size:,} bytes; at most {MAX_FILE_BYTES:,} are read",
                    fix="a configuration is far smaller: check that this is the right file",
                    source=str(p),
                )
            )
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            Problem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})", source=str(p))
        ) from None
    except OSError as exc:
        raise ConfigError(
            Problem("", f"cannot read the file: {exc.strerror or exc}", source=str(p))
        ) from None
    return parse_yaml_text(text, str(p))
