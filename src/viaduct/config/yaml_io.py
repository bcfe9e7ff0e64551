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
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _scalar_yaml(value: Any) -> str:
    text = yaml.dump(
        value, Dumper=_Dumper, default_flow_style=True, allow_unicode=True, width=10_000, sort_keys=False
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


def parse_yaml_text(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """(data, {dotted path: line}) for YAML text; syntax errors become a `ConfigError` at file:line."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
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
    if isinstance(data, dict) and "${" in text:
        data = _resolve_interpolations(data, source)
    return data, lines


def _resolve_interpolations(data: dict[str, Any], source: str) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
        raise ConfigError(
            Problem(str(key), f"interpolation failed: {msg}", fix="check the ${...} reference", source=source)
        ) from None


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
    return parse_yaml_text(p.read_text(), str(p))
