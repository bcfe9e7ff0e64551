"""The embedded default data: Python's own documentation, turned into a BPE tokenizer and a dataset.

Every Python ships the English text of its documentation's topics in `pydoc_data.topics` (what
`help("for")` prints). On first use viaduct cuts it into documents, trains a small byte-level BPE
tokenizer on it with the `tokenizers` library and writes a Megatron indexed dataset, both cached
under the user's cache directory (`$VIADUCT_CACHE`, else `$XDG_CACHE_HOME/viaduct`, else
`~/.cache/viaduct`). Nothing is downloaded and nothing large is committed.

Configs name them with the `builtin:` scheme:

    tokenizer.tokenizer_type: HuggingFaceTokenizer
    tokenizer.tokenizer_model: builtin:pydoc-bpe
    dataset.data_path: builtin:pydoc

The cache key holds the Python version (its docs differ) and a format version; files are written
to a temporary directory and renamed, so concurrent ranks building at once are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeGuard, TypeVar

from viaduct.config import ConfigError, Problem

_T = TypeVar("_T")

SCHEME = "builtin:"
_FORMAT = 1
_VOCAB_SIZE = 4096
_DOC_CHARS = 2000  # topics are cut into documents of about this many characters at paragraph breaks
EOD_TOKEN = "<|endoftext|>"
_SPECIAL = [EOD_TOKEN, "<pad>", "<s>"]


def is_builtin(name: str | None) -> TypeGuard[str]:
    return isinstance(name, str) and name.startswith(SCHEME)


def cache_root() -> Path:
    """Where viaduct caches what it builds for the user (not per project)."""
    if os.environ.get("VIADUCT_CACHE"):
        return Path(os.environ["VIADUCT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "viaduct"


def _key() -> str:
    texts = pydoc_documents()
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    return f"pydoc-v{_FORMAT}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"


def pydoc_documents() -> list[str]:
    """The documentation topics, cut at paragraph breaks into documents of about 2,000 characters."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        current = ""
        for para in topics[name].split("\n\n"):
            if current and len(current) + len(para) > _DOC_CHARS:
                docs.append(current.strip())
                current = ""
            current += para + "\n\n"
        if current.strip():
            docs.append(current.strip())
    return docs


def _atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling directory and rename it to `target` (first writer wins)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def pydoc_tokenizer_dir() -> Path:
    """Directory holding tokenizer.json (+ tokenizer_config.json) of the built-in BPE tokenizer."""

    def build(out: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_SIZE,
            special_tokens=_SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(pydoc_documents(), trainer=trainer)
        tok.save(str(out / "tokenizer.json"))
        config = {"eos_token": EOD_TOKEN, "pad_token": "<pad>", "bos_token": "<s>"}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    return _atomic_dir(cache_root() / _key() / "tokenizer", build)


def pydoc_dataset_prefix() -> str:
    """Prefix of the indexed dataset (`<prefix>.bin` / `.idx`) of the documentation, end-of-document
    tokens appended; built on first use with the built-in tokenizer."""

    def build(out: Path) -> None:
        import numpy as np
        from tokenizers import Tokenizer

        from viaduct.data.indexed import IndexedDatasetWriter, token_dtype

        tok = Tokenizer.from_file(str(pydoc_tokenizer_dir() / "tokenizer.json"))
        eod = tok.token_to_id(EOD_TOKEN)
        dtype = token_dtype(tok.get_vocab_size())
        with IndexedDatasetWriter(str(out / "pydoc_text_document"), dtype) as writer:
            for enc in tok.encode_batch(pydoc_documents()):
                writer.add_document(np.asarray([*enc.ids, eod], dtype=dtype))

    return str(_atomic_dir(cache_root() / _key() / "dataset", build) / "pydoc_text_document")


_TOKENIZERS: dict[str, Callable[[], Path]] = {"pydoc-bpe": pydoc_tokenizer_dir}
_DATASETS: dict[str, Callable[[], str]] = {"pydoc": pydoc_dataset_prefix}


def resolve_tokenizer(name: str, field: str = "tokenizer.tokenizer_model") -> str:
    """`builtin:NAME` -> a local tokenizer directory (built on first use)."""
    return str(_lookup(_TOKENIZERS, name, field)())


def resolve_dataset(name: str, field: str = "dataset.data_path") -> str:
    """`builtin:NAME` -> a local indexed-dataset prefix (built on first use)."""
    return str(_lookup(_DATASETS, name, field)())


def _lookup(table: Mapping[str, _T], name: str, field: str) -> _T:
    key = name[len(SCHEME) :] if is_builtin(name) else name
    if key not in table:
        raise ConfigError(
            Problem(
                field,
                "no such built-in",
                name,
                fix="use one of " + ", ".join(SCHEME + k for k in sorted(table)),
            )
        )
    return table[key]
