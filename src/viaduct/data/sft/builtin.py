"""`builtin:pydoc-sft`: a small instruction dataset built on first use from Python's own docs.

Every Python ships its documentation topics (`pydoc_data.topics`, what `help("for")` prints); from
them this builds `training.jsonl`, `validation.jsonl` and `test.jsonl` of `{"input", "output"}`
records of two kinds:

- "What is the title of the Python help topic 'for'?" -> "The "for" statement";
- "Continue this sentence from the Python documentation on <title>: <first words>" -> the rest.

About 5% of the records go to validation and 5% to test, chosen by a hash of the record, so the
split is stable. The files are cached under viaduct's cache directory (`$VIADUCT_CACHE`, see
`viaduct.data.builtin`), written to a temporary directory and renamed. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from viaduct.data.builtin import _atomic_dir, cache_root

_FORMAT = 1
_HEADING = re.compile(r"^(.+)\n[*=\-]{3,}\s*$", re.MULTILINE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def pydoc_sft_records() -> list[dict[str, str]]:
    """The records of the dataset, in a fixed order."""
    from pydoc_data.topics import topics

    records: list[dict[str, str]] = []
    for key in sorted(topics):
        text = topics[key].strip()
        m = _HEADING.match(text)
        title = m.group(1).strip() if m else key
        records.append({"input": f"What is the title of the Python help topic {key!r}?", "output": title})
        for para in text.split("\n\n"):
            lines = para.strip().splitlines()
            # Prose only: no code blocks (indented), grammar rules or headings.
            if not lines or para.startswith(" ") or any(set(ln.strip()) <= set("*=-") for ln in lines):
                continue
            sentence = _SENTENCE.split(" ".join(ln.strip() for ln in lines))[0]
            words = sentence.split()
            if not 8 <= len(words) <= 40 or "::=" in sentence:
                continue
            cut = len(words) // 2
            records.append(
                {
                    "input": f"Continue this sentence from the Python documentation on {title}: "
                    + " ".join(words[:cut]),
                    "output": " ".join(words[cut:]),
                }
            )
    return records


def _split_of(record: dict[str, str]) -> str:
    h = hashlib.sha256(record["input"].encode()).digest()[0]
    return "validation" if h < 13 else "test" if h < 26 else "training"


def pydoc_sft_dir() -> Path:
    """The directory of the dataset's three JSONL files (built on first use)."""

    def build(out: Path) -> None:
        files = {
            name: open(out / f"{name}.jsonl", "w", encoding="utf-8")
            for name in ("training", "validation", "test")
        }
        try:
            for r in pydoc_sft_records():
                files[_split_of(r)].write(json.dumps(r, ensure_ascii=False) + "\n")
        finally:
            for f in files.values():
                f.close()

    digest = hashlib.sha256(json.dumps(pydoc_sft_records()).encode()).hexdigest()[:12]
    key = f"pydoc-sft-v{_FORMAT}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"
    return _atomic_dir(cache_root() / key, build)


def resolve_dataset_root(root: str) -> str:
    """`builtin:NAME` -> its directory; other values unchanged (validation already checked NAME)."""
    if root == "builtin:pydoc-sft":
        return str(pydoc_sft_dir())
    return root
