"""The reference (Megatron Bridge) fields viaduct leaves out, and why: docs/left-out-fields.md.

Each config class lists them in `_legacy_fields_`; this module renders that list, and a test keeps
the committed page in step with the code:
`python -m viaduct.training.config.reference > docs/left-out-fields.md`.
"""

from __future__ import annotations

import inspect

from viaduct.config.base import ConfigBase


def _classes() -> list[type[ConfigBase]]:
    from viaduct.training.config import ConfigContainer

    seen: list[type[ConfigBase]] = []
    todo: list[type[ConfigBase]] = [ConfigContainer]
    while todo:
        cls = todo.pop(0)
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, ConfigBase) and klass is not ConfigBase:
                if klass not in seen:
                    seen.append(klass)
        for variant in cls.variants():
            if variant not in seen:
                todo.append(variant)
        for section, _owner in cls.__dict__.get("_moved_sections_", {}).values():
            if section not in seen and section not in todo:
                todo.append(section)
        for info in cls.spec().fields.values():
            from viaduct.config.overrides import config_type_in

            sub = config_type_in(info.type)
            if sub is not None and sub not in seen and sub not in todo:
                todo.append(sub)
    return seen


def left_out_fields_markdown() -> str:
    lines = [
        "# Reference fields viaduct leaves out",
        "",
        "Generated from the `_legacy_fields_` of each config class (do not edit by hand; regenerate with",
        "`python -m viaduct.training.config.reference > docs/left-out-fields.md`).",
        "",
        "A Megatron Bridge YAML file that contains one of these keys still loads: the key is dropped and",
        "reported in one warning. Fields that viaduct keeps but cannot act on yet are not listed here: they",
        'exist, and setting them fails validation with "... is not supported yet".',
        "",
    ]
    for cls in _classes():
        own = cls.__dict__.get("_legacy_fields_", {})
        if not own:
            continue
        lines += [f"## `{cls.__name__}`", "", "| field | why it is left out |", "|---|---|"]
        lines += [f"| `{name}` | {why} |" for name, why in sorted(own.items())]
        lines.append("")
    return "\n".join(lines)


def unsupported_fields_markdown() -> str:
    lines = ["| field | not supported yet |", "|---|---|"]
    for cls in _classes():
        if cls.__dict__.get("_unsupported_"):
            lines.append(f"| `{cls.__name__}` (whole component) | {cls._unsupported_} |")
        for name, info in cls.spec().fields.items():
            if info.unsupported and name in inspect.get_annotations(cls):
                lines.append(f"| `{cls.__name__}.{name}` | {info.unsupported} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(left_out_fields_markdown(), end="")
