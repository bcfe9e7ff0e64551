"""Data for training: tokenizers, datasets, resumable samplers and the loaders the loop reads.

Built now: byte-level and null tokenizers, synthetic (mock) GPT data, the "single" and "cyclic"
samplers. Megatron indexed datasets (.bin/.idx), blends and the file-based tokenizers come later
and plug into `build_tokenizer` and `build_train_valid_test_datasets`.
"""

from viaduct.data.loaders import (
    build_data_loader,
    build_train_valid_test_data_iterators,
    build_train_valid_test_datasets,
    get_sample_counts,
)
from viaduct.data.mock import MockGPTDataset
from viaduct.data.samplers import PretrainingRandomSampler, PretrainingSampler
from viaduct.data.tokenizers import ByteLevelTokenizer, NullTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteLevelTokenizer",
    "MockGPTDataset",
    "NullTokenizer",
    "PretrainingRandomSampler",
    "PretrainingSampler",
    "Tokenizer",
    "build_data_loader",
    "build_tokenizer",
    "build_train_valid_test_data_iterators",
    "build_train_valid_test_datasets",
    "get_sample_counts",
]
