"""The public config surface is a contract: a new, renamed or re-defaulted field is a deliberate act.

When this test fails on purpose, regenerate the snapshot:
    python tests/test_public_surface.py > tests/public_surface.json
"""

import json
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("public_surface.json")


def _full_fields(cls: type) -> dict[str, dict]:
    """Every public field of `cls` with its type, default and markers, as the snapshot records them."""
    from viaduct.config.codec import encode
    from viaduct.config.typing_utils import type_name

    fields = {}
    for name, info in cls.spec().fields.items():
        if name.startswith("_"):
            continue
        fields[name] = {
            "type": type_name(info.type),
            "default": "<required>" if info.required else encode(info.default_value(), info.type),
            **({"derived": True} if info.derived else {}),
            **({"unsupported": info.unsupported} if info.unsupported else {}),
        }
    return json.loads(json.dumps(fields, default=repr))


def surface() -> dict:
    """Each config class once: its config bases and only the fields it adds or changes.

    A field inherited unchanged is recorded in the class that defines it, so one change to a base
    class changes one entry of the snapshot, not one per subclass.
    """
    from viaduct.training.config.reference import _classes

    classes = _classes()
    full = {cls: _full_fields(cls) for cls in classes}
    out = {}
    for cls in classes:
        bases = [base for base in cls.__mro__[1:] if base in full]
        inherited: dict[str, dict] = {}
        for base in reversed(bases):  # nearest base last, so it wins
            inherited.update(full[base])
        own = {name: entry for name, entry in full[cls].items() if inherited.get(name) != entry}
        direct = [base for base in cls.__bases__ if base in full]
        out[f"{cls.__module__}.{cls.__qualname__}"] = {
            "bases": [f"{base.__module__}.{base.__qualname__}" for base in direct],
            "fields": own,
        }
    return out


def test_public_surface_matches_snapshot():
    assert surface() == json.loads(SNAPSHOT.read_text()), (
        "the config surface changed; if on purpose, regenerate tests/public_surface.json (module docstring)"
    )


def test_every_field_has_a_docstring():
    from viaduct.config.docstrings import field_docstrings
    from viaduct.training.config.reference import _classes

    missing = [
        f"{cls.__name__}.{name}"
        for cls in _classes()
        for name in cls.spec().public_names()
        if not field_docstrings(cls).get(name)
    ]
    assert missing == []


def test_left_out_fields_doc_is_current():
    from viaduct.training.config.reference import left_out_fields_markdown

    doc = Path(__file__).parents[1] / "docs" / "left-out-fields.md"
    assert doc.read_text() == left_out_fields_markdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    print(json.dumps(surface(), indent=1, sort_keys=True))
