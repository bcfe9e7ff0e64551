"""Megatron's T5 dataset: span corruption over the documents of an indexed dataset.

Samples (facts from Megatron Core's `masked_dataset.py`, `t5_dataset.py` and the `build_mapping`
helper; the code is ours):

- the sample index lists, per sample, a run of consecutive sequences ("sentences") of one document
  and a target length. Each document is walked sentence by sentence; a sample ends once it holds at
  least the target length (unless only one sentence of the document would be left over) or at the
  document's end. The target length is the encoder length less 2, or, with probability
  about short_sequence_probability, a length drawn from [2, encoder length - 2]. Megatron's rule that
  a document of several sentences with one longer than 512 tokens is skipped is kept. Epochs are
  walked until the requested number of samples is reached; the rows are then shuffled.
  The target lengths come from `numpy.random.RandomState(random_seed)` drawing uint32 values,
  the same Mersenne Twister stream as Megatron's `std::mt19937(seed)`; the rows are shuffled as
  Megatron shuffles them (Fisher-Yates with `std::mt19937_64(random_seed + 1)`, reimplemented
  here), so the sample index is Megatron's row for row. Cached as .npy like the GPT indices.
- sample i reads its sentences, truncated to the target length, and masks spans with
  `numpy.random.RandomState((random_seed + i) % 2**32)` (Megatron's seeding): a sample depends only
  on the seed and its index, never on the order samples are read, so a resumed run sees the same
  samples. The masking rules and the sample dict are in `viaduct.data.t5_masking`.

For data preprocessed one sequence per document (no sentence splitting), each sample is the start
of one document, as in Megatron: give `viaduct data preprocess` each document as a list of
sentences (a JSON list of strings) to use whole documents.

`MockT5Dataset` gives the same dict from synthetic counting tokens (no files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from viaduct.config import ConfigError, Problem
from viaduct.data.index_cache import (
    atomic_save,
    atomic_write_text,
    file_signature,
    first_bad_row,
    load_cached_indices,
    load_index_file,
    resolve_cache_dir,
)
from viaduct.data.indexed import IndexedDataset
from viaduct.data.mock import SPLIT_IDS
from viaduct.data.t5_masking import (
    DEFAULT_DECODER_LENGTH,
    MaskingSettings,
    SpecialTokens,
    corrupt,
    max_spans,
    max_target_length,
    short_ratio,
    short_target_length,
)

if TYPE_CHECKING:
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config.t5_dataset import T5DatasetConfig

logger = logging.getLogger(__name__)

_FORMAT = 2  # bump when the index algorithm changes, so old caches are not reused
LONG_SENTENCE_LEN = 512
"""A document of several sentences with one longer than this is skipped (Megatron's rule)."""
_DRAW_CHUNK = 1 << 16


# ------------------------------------------------------------------------------------------ lengths


def t5_lengths(
    config: T5DatasetConfig, model_seq_length: int | None = None, model_seq_length_dec: int | None = None
) -> tuple[int, int]:
    """(encoder, decoder) tokens per sample: the dataset's fields first, then the model's values,
    and 128 for the decoder when neither names one. ConfigError when no encoder length is known."""
    encoder = (
        config.sequence_length_encoder or config.seq_length or config.sequence_length or model_seq_length
    )
    decoder = config.sequence_length_decoder or model_seq_length_dec or DEFAULT_DECODER_LENGTH
    if encoder is None:
        raise ConfigError(
            Problem(
                "dataset.seq_length",
                "is unset and no model length was given: the T5 encoder length is unknown",
                fix="set dataset.seq_length (or model.seq_length)",
            )
        )
    problems = [
        Problem(name, "must be >= 3 (a token, a sentinel and eos/bos)", value, fix=f"set {name} to 3 or more")
        for name, value in (("dataset.seq_length", encoder), ("dataset.sequence_length_decoder", decoder))
        if value < 3
    ]
    if problems:
        raise ConfigError(problems)
    return int(encoder), int(decoder)


# ------------------------------------------------------------------------------------ sample index


class _Uint32Draws:
    """uint32 values of Mersenne Twister seeded like `std::mt19937(seed)`, one at a time, drawn in
    chunks (numpy fills a full-range uint32 array straight from the generator, in order)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.RandomState(seed % 2**32)
        self._buf: list[int] = []
        self._pos = 0

    def __call__(self) -> int:
        if self._pos == len(self._buf):
            self._buf = self._rng.randint(0, 2**32, size=_DRAW_CHUNK, dtype=np.uint64).tolist()
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]


def build_t5_sample_index(
    document_starts: np.ndarray,
    document_ends: np.ndarray,
    sequence_lengths: np.ndarray,
    num_samples: int | None,
    max_length: int,
    short_sequence_probability: float,
    seed: int,
) -> np.ndarray:
    """[samples, 3] int64 rows (first sequence, end sequence (exclusive), target length), shuffled.

    Document d holds sequences [document_starts[d], document_ends[d]). Whole epochs are walked until
    there are num_samples rows (one epoch when None). ValueError when no document is usable.
    """
    starts = np.asarray(document_starts, dtype=np.int64)
    ends = np.asarray(document_ends, dtype=np.int64)
    lengths = np.asarray(sequence_lengths)
    count = ends - starts
    long_before = np.concatenate(([0], np.cumsum(lengths > LONG_SENTENCE_LEN, dtype=np.int64)))
    has_long = long_before[ends] > long_before[starts]
    usable = np.flatnonzero((count >= 1) & ~((count > 1) & has_long))
    if usable.size == 0:
        raise ValueError(
            f"none of the {starts.size} documents can give a sample (each is empty, or holds several "
            f"sequences one of which is longer than {LONG_SENTENCE_LEN} tokens)"
        )
    ratio = short_ratio(short_sequence_probability)
    draw = _Uint32Draws(seed)

    def target() -> int:
        return max_length if ratio == 0 else short_target_length(draw(), max_length, ratio)

    rows = array("q")
    spans = [(int(starts[d]), int(ends[d])) for d in usable]
    lens = lengths.tolist() if len(lengths) <= 1 << 24 else lengths
    while True:
        for first, last in spans:
            want = target()
            total, prev = 0, first
            for s in range(first, last):
                total += int(lens[s])
                # Close the sample once it is long enough, unless that would leave one sentence
                # alone (Megatron's rule), and always at the document's end.
                if (total >= want and last - s - 1 > 1) or s == last - 1:
                    rows.extend((prev, s + 1, want))
                    prev, total, want = s + 1, 0, target()
        if num_samples is None or len(rows) // 3 >= num_samples:
            break
    index = np.frombuffer(rows, dtype=np.int64).reshape(-1, 3)
    return index[megatron_shuffle_order(index.shape[0], seed + 1)]


# Megatron shuffles the rows with std::mt19937_64: the 64-bit Mersenne Twister's constants.
_MT_N, _MT_M = 312, 156
_MT_A = np.uint64(0xB5026F5AA96619E9)
_MT_UPPER, _MT_LOWER = np.uint64(0xFFFFFFFF80000000), np.uint64(0x7FFFFFFF)


def mt19937_64(seed: int, count: int) -> np.ndarray:
    """The first `count` outputs of C++'s `std::mt19937_64(seed)`, as uint64 (vectorized per block)."""
    state = [seed % 2**64]
    for i in range(1, _MT_N):  # the standard initialization (Python ints: exact mod 2**64)
        prev = state[-1]
        state.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) % 2**64)
    mt = np.array(state, dtype=np.uint64)
    out = np.empty(-(-count // _MT_N) * _MT_N, dtype=np.uint64)
    one = np.uint64(1)

    def twist(x: np.ndarray) -> np.ndarray:
        return (x >> one) ^ np.where(x & one, _MT_A, np.uint64(0))

    for block in range(0, out.size, _MT_N):
        # Regenerate in three runs, so each reads the values the sequential twist would see.
        k = _MT_N - _MT_M
        mt[:k] = mt[_MT_M:] ^ twist((mt[:k] & _MT_UPPER) | (mt[1 : k + 1] & _MT_LOWER))
        mt[k:-1] = mt[: _MT_N - 1 - k] ^ twist((mt[k:-1] & _MT_UPPER) | (mt[k + 1 :] & _MT_LOWER))
        mt[-1:] = mt[_MT_M - 1 : _MT_M] ^ twist((mt[-1:] & _MT_UPPER) | (mt[:1] & _MT_LOWER))
        y = mt.copy()
        y ^= (y >> np.uint64(29)) & np.uint64(0x5555555555555555)
        y ^= (y << np.uint64(17)) & np.uint64(0x71D67FFFEDA60000)
        y ^= (y << np.uint64(37)) & np.uint64(0xFFF7EEE000000000)
        y ^= y >> np.uint64(43)
        out[block : block + _MT_N] = y
    return out[:count]


def megatron_shuffle_order(count: int, seed: int) -> np.ndarray:
    """The order Megatron's `build_mapping` shuffles `count` rows into: a Fisher-Yates shuffle from
    the last row down, swapping row i with row `rand() % (i + 1)` of `std::mt19937_64(seed)`."""
    if count <= 1:
        return np.arange(count, dtype=np.int64)
    bounds = np.arange(count, 1, -1, dtype=np.uint64)  # i + 1 for i = count - 1, ..., 1
    swaps = (mt19937_64(seed, count - 1) % bounds).tolist()
    order = list(range(count))
    for i, j in zip(range(count - 1, 0, -1), swaps):  # sequential by nature; a list keeps it quick
        order[i], order[j] = order[j], order[i]
    return np.asarray(order, dtype=np.int64)


# ------------------------------------------------------------------------------------------ dataset


class T5Dataset(Dataset[dict[str, torch.Tensor]]):
    """T5 span-corruption samples from the documents `document_ids` of one indexed dataset.

    `indexed` is an open `IndexedDataset` or its prefix. `document_ids` are documents of the index
    (its `document_indices`), not sequences. `num_samples` None builds one epoch; `len()` is every
    sample of the epochs built, which may exceed num_samples (as in Megatron). Lengths: see
    `t5_lengths` (`seq_length` / `seq_length_dec` are the model's). `cache_dir` overrides where the
    sample index is cached; `built_anew` says whether this construction built it.
    """

    def __init__(
        self,
        indexed: IndexedDataset | str,
        document_ids: np.ndarray,
        num_samples: int | None,
        config: T5DatasetConfig,
        tokenizer: Tokenizer,
        split: str,
        *,
        seq_length: int | None = None,
        seq_length_dec: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.indexed = (
            IndexedDataset(indexed, mmap=bool(config.mmap_bin_files)) if isinstance(indexed, str) else indexed
        )
        self.prefix = str(self.indexed.prefix)
        self.encoder_length, self.decoder_length = t5_lengths(config, seq_length, seq_length_dec)
        self.max_target = max_target_length(self.encoder_length)
        self.settings = MaskingSettings.of(config)
        self.special = SpecialTokens.of(
            tokenizer, max_spans(self.encoder_length, self.decoder_length, self.settings.probability)
        )
        self.documents = np.asarray(document_ids, dtype=np.int64)
        n_docs = self.indexed.num_documents
        if self.documents.size == 0 or int(self.documents.min()) < 0 or int(self.documents.max()) >= n_docs:
            span = (
                f"documents {int(self.documents.min())} to {int(self.documents.max())}"
                if self.documents.size
                else "no documents"
            )
            raise ConfigError(
                Problem(
                    self.prefix + ".idx",
                    f"holds {n_docs} documents; the {split} split asks for {span}",
                    fix="the cut of the data into splits does not fit this file; rebuild the datasets",
                )
            )
        self.num_samples = None if num_samples is None else int(num_samples)
        self.split = split
        self.seed = int(config.random_seed)
        self.short_probability = float(config.short_sequence_probability)
        description = {
            "class": type(self).__name__,
            "format": _FORMAT,
            **file_signature(self.prefix),
            "split": split,
            "documents": {
                "count": int(self.documents.size),
                "sha1": hashlib.sha1(self.documents.tobytes()).hexdigest(),
            },
            "num_samples": self.num_samples,
            "max_target_length": self.max_target,
            "short_sequence_probability": self.short_probability,
            "random_seed": self.seed,
            "long_sentence_length": LONG_SENTENCE_LEN,
        }
        self.description = json.dumps(description, indent=2, sort_keys=True)
        self.description_hash = hashlib.md5(self.description.encode()).hexdigest()
        self.cache_dir = resolve_cache_dir(self.prefix, cache_dir if cache_dir else config.path_to_cache)
        self.built_anew = False
        self.sample_index = self._load_or_build()

    # -------------------------------------------------------------------------------- index file

    def _paths(self) -> dict[str, Path]:
        base = f"{self.description_hash}-{type(self).__name__}-{self.split}"
        return {
            "description": self.cache_dir / f"{base}-description.txt",
            "sample_index": self.cache_dir / f"{base}-sample_index.npy",
        }

    def _load_or_build(self) -> np.ndarray:
        paths = self._paths()
        cached = load_cached_indices(paths, ("sample_index",), self.description, self.cache_problem)
        if cached is not None:
            return cached[0]
        start = time.perf_counter()
        index = self.build_sample_index()
        atomic_save(paths["sample_index"], index)
        atomic_write_text(paths["description"], self.description)  # written last: marks the set complete
        self.built_anew = True
        logger.info(
            "built T5Dataset %s sample index for %s: %d samples in %.2f s (cached in %s)",
            self.split,
            self.prefix,
            index.shape[0],
            time.perf_counter() - start,
            self.cache_dir,
        )
        return index

    def build_sample_index(self) -> np.ndarray:
        """The sample index computed from the data (no cache)."""
        doc_index = self.indexed.document_indices
        try:
            return build_t5_sample_index(
                doc_index[self.documents],
                doc_index[self.documents + 1],
                self.indexed.sequence_lengths,
                self.num_samples,
                self.max_target,
                self.short_probability,
                self.seed,
            )
        except ValueError as err:
            raise ConfigError(
                Problem(
                    self.prefix + ".idx",
                    f"the {self.split} split gives no T5 samples: {err}",
                    fix="give the split more documents, or preprocess each long document as a list of "
                    "sentences (viaduct data preprocess with a JSON list of strings per document)",
                )
            ) from err

    def cache_problem(self, arrays: tuple[np.ndarray, ...]) -> str | None:
        """What is wrong with a cached sample index for this dataset (None when it fits)."""
        (index,) = arrays
        if index.dtype != np.int64 or index.ndim != 2 or index.shape[1] != 3:
            return (
                f"sample_index is a {index.dtype} array of shape {index.shape}, expected [samples, 3] int64"
            )
        rows = int(index.shape[0])
        if rows == 0 or (self.num_samples is not None and rows < self.num_samples):
            return f"holds {rows} samples, fewer than the {self.num_samples or 1} asked for"
        bounds = self.indexed.document_indices
        n_seq = len(self.indexed)

        def bad(a: int, b: int) -> np.ndarray:
            block = np.array(index[a:b])
            first, end, want = block[:, 0], block[:, 1], block[:, 2]
            hit = (
                (first < 0)
                | (end <= first)
                | (end > n_seq)
                | (want < min(2, self.max_target))
                | (want > self.max_target)
            )
            if hit.any():
                return hit
            # Every sample reads sentences of one document.
            doc = np.searchsorted(bounds, first, side="right") - 1
            return end > bounds[doc + 1]

        row = first_bad_row(rows, bad)
        if row is not None:
            return f"sample_index row {row} = {index[row].tolist()} does not lie within one document"
        return None

    # ------------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    def tokens_of(self, idx: int) -> tuple[np.ndarray, int]:
        """(raw tokens, target length) of sample `idx`: at most target + 1 tokens are read, so a
        longer run shows it was truncated."""
        first, end, want = (int(v) for v in self.sample_index[idx])
        parts, room = [], want + 1
        for s in range(first, end):
            size = min(int(self.indexed.sequence_lengths[s]), room)
            parts.append(self.indexed.get(s, 0, size))
            room -= size
            if room == 0:
                break
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return tokens.astype(np.int64), want

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        tokens, want = self.tokens_of(idx)
        rng = np.random.RandomState((self.seed + idx) % 2**32)
        return corrupt(
            tokens, want, rng, self.settings, self.special, self.encoder_length, self.decoder_length
        )

    def __getstate__(self) -> dict[str, object]:
        # Workers re-open the memory map of the cached index instead of copying it.
        state = self.__dict__.copy()
        state["sample_index"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.sample_index = load_index_file(self._paths()["sample_index"])

    def __repr__(self) -> str:
        return (
            f"T5Dataset(prefix={self.prefix!r}, split={self.split!r}, documents={self.documents.size}, "
            f"samples={len(self)}, encoder={self.encoder_length}, decoder={self.decoder_length}, "
            f"seed={self.seed})"
        )


class MockT5Dataset(Dataset[dict[str, torch.Tensor]]):
    """`num_samples` synthetic T5 samples for one split: the same dict as T5Dataset.

    Each sample is a run of counting tokens (a random start, then +1 per token through the
    tokenizer's ordinary ids) as long as its target length (drawn as T5Dataset draws it), masked
    as T5Dataset masks. Sample i depends on (random_seed, split, i) alone.
    """

    def __init__(
        self,
        num_samples: int,
        tokenizer: Tokenizer,
        config: T5DatasetConfig,
        split: str,
        *,
        seq_length: int | None = None,
        seq_length_dec: int | None = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
        self.num_samples = int(num_samples)
        self.split = split
        self.seed = int(config.random_seed)
        self.encoder_length, self.decoder_length = t5_lengths(config, seq_length, seq_length_dec)
        self.max_target = max_target_length(self.encoder_length)
        self.settings = MaskingSettings.of(config)
        self.special = SpecialTokens.of(
            tokenizer, max_spans(self.encoder_length, self.decoder_length, self.settings.probability)
        )
        self.ratio = short_ratio(float(config.short_sequence_probability))
        vocab = int(tokenizer.vocab_size)
        specials = {t for t in self.special.excluded if 0 <= t < vocab}
        self.ordinary = np.setdiff1d(np.arange(vocab, dtype=np.int64), np.fromiter(specials, np.int64))
        if self.ordinary.size == 0:
            raise ValueError(f"no ordinary token ids (vocab_size {vocab}, special ids {sorted(specials)})")
        self._split_id = SPLIT_IDS[split]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        g = np.random.default_rng((self.seed, self._split_id, idx))
        draw, first, mask_seed = (int(v) for v in g.integers(0, 2**32, size=3))
        want = self.max_target if self.ratio == 0 else short_target_length(draw, self.max_target, self.ratio)
        tokens = self.ordinary[(first + np.arange(want)) % self.ordinary.size]
        rng = np.random.RandomState(mask_seed)
        return corrupt(
            tokens, want, rng, self.settings, self.special, self.encoder_length, self.decoder_length
        )

    def __repr__(self) -> str:
        return (
            f"MockT5Dataset(split={self.split!r}, num_samples={self.num_samples}, "
            f"encoder={self.encoder_length}, decoder={self.decoder_length}, seed={self.seed})"
        )


__all__ = ["LONG_SENTENCE_LEN", "MockT5Dataset", "T5Dataset", "build_t5_sample_index", "t5_lengths"]
