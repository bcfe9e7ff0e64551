"""Data for training: tokenizers, datasets, resumable samplers and the loaders the loop reads.

* `indexed`: Megatron's `.bin`/`.idx` format (memory-mapped reader, streaming writer);
  `preprocess`: JSONL -> indexed dataset (`viaduct data preprocess`);
* `gpt_dataset`, `blended`, `builder`: Megatron's GPT dataset (documents packed into samples
  through cached document / sample / shuffle indices), blends and splits; `index_cache`: where those
  caches live, their atomic writes and safe reads; `mock`: synthetic data;
* `tokenizers`: Hugging Face, SentencePiece, GPT-2 BPE, tiktoken, null and byte-level;
* `builtin`: the embedded default corpus (Python's documentation) and its BPE tokenizer;
* `samplers`, `loaders`: resumable samplers and the DataLoaders the loop reads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use: `viaduct data preprocess` and its worker processes import
# `viaduct.data.preprocess`, which needs neither torch nor the datasets, so importing this package
# must not pull them in.
_EXPORTS = {
    "BlendedDataset": "blended",
    "build_gpt_datasets": "builder",
    "GPTDataset": "gpt_dataset",
    "IndexCacheWarning": "gpt_dataset",
    "CorruptIndexError": "indexed",
    "IndexedDataset": "indexed",
    "IndexedDatasetWriter": "indexed",
    "build_data_loader": "loaders",
    "build_train_valid_test_data_iterators": "loaders",
    "build_train_valid_test_datasets": "loaders",
    "get_sample_counts": "loaders",
    "MockGPTDataset": "mock",
    "PretrainingRandomSampler": "samplers",
    "PretrainingSampler": "samplers",
    "ByteLevelTokenizer": "tokenizers",
    "NullTokenizer": "tokenizers",
    "Tokenizer": "tokenizers",
    "build_tokenizer": "tokenizers",
}

if TYPE_CHECKING:
    from viaduct.data.blended import BlendedDataset
    from viaduct.data.builder import build_gpt_datasets
    from viaduct.data.gpt_dataset import GPTDataset, IndexCacheWarning
    from viaduct.data.indexed import CorruptIndexError, IndexedDataset, IndexedDatasetWriter
    from viaduct.data.loaders import (
        build_data_loader,
        build_train_valid_test_data_iterators,
        build_train_valid_test_datasets,
        get_sample_counts,
    )
    from viaduct.data.mock import MockGPTDataset
    from viaduct.data.samplers import PretrainingRandomSampler, PretrainingSampler
    from viaduct.data.tokenizers import ByteLevelTokenizer, NullTokenizer, Tokenizer, build_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'viaduct.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"viaduct.data.{module}"), name)


__all__ = [
    "BlendedDataset",
    "ByteLevelTokenizer",
    "CorruptIndexError",
    "GPTDataset",
    "IndexCacheWarning",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "MockGPTDataset",
    "NullTokenizer",
    "PretrainingRandomSampler",
    "PretrainingSampler",
    "Tokenizer",
    "build_data_loader",
    "build_gpt_datasets",
    "build_tokenizer",
    "build_train_valid_test_data_iterators",
    "build_train_valid_test_datasets",
    "get_sample_counts",
]
