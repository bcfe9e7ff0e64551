"""Megatron's GPT dataset: documents of an indexed dataset packed into fixed-length samples.

Three indices, built with vectorised numpy (no Python loop per document or per sample) and cached
as .npy files, map a sample number to tokens (facts from Megatron Core's gpt_dataset.py and the
`build_sample_idx` helper; the code is ours):

- document index: the split's documents repeated over as many epochs as the requested samples
  need, shuffled with `numpy.random.RandomState(random_seed)`. When the last epoch would contribute
  fewer than 80% of an epoch's samples it is shuffled on its own ("separate final epoch"), so the
  partial epoch does not dilute the full ones.
- sample index: [samples + 1, 2] rows (position in the document index, token offset in that
  document) where each sample starts. Laying the documents back to back, sample k starts at token
  k·seq_length and reads seq_length (+1 with add_extra_token_to_sequence) tokens, so consecutive
  samples share one token: the last input of sample k is where sample k + 1 starts.
- shuffle index: a permutation of the samples (the samples of a separate final epoch are
  shuffled among themselves, after the others).

For GPT data a "document" here is one sequence of the indexed dataset (Megatron splits and packs
GPT data by sequence; preprocessing writes one sequence per document).

Caching: files are keyed by an md5 of everything that determines them (the prefix, size and mtime
of its .idx, the split's documents, num_samples, seq_length, seed, add_extra_token, the partial-
sequence rule). Each file is written to a temporary name and renamed, the description last, so
a reader never sees a half-written cache and concurrent ranks building the same files are safe.
The loader should still let global rank 0 build first and the other ranks load after a barrier,
which saves them the work.

A cache file is untrusted input: it is memory-mapped without unpickling, and its dtype, shape and
bounds are checked against what this dataset expects (exactly, when the indexed dataset is already
open; by structure and bounds otherwise). A truncated, garbled or foreign file is rebuilt with an
`IndexCacheWarning`, never a crash; ranks rebuilding at once write the same bytes aside and rename.
Where the files live and how they are written and read back is `viaduct.data.index_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from viaduct.config import ConfigError, Problem
from viaduct.data.index_cache import (
    IndexCacheWarning as IndexCacheWarning,  # re-exported: the warning of this dataset's cache
)
from viaduct.data.index_cache import (
    atomic_save,
    atomic_write_text,
    file_signature,
    first_bad_row,
    load_cached_indices,
    load_index_file,
    resolve_cache_dir,
)
from viaduct.data.mock import _document_causal_mask

if TYPE_CHECKING:
    from viaduct.data.indexed import IndexedDataset
    from viaduct.data.tokenizers import Tokenizer
    from viaduct.training.config.dataset import GPTDatasetConfig

logger = logging.getLogger(__name__)

_FORMAT = 1  # bump when the index algorithm changes, so old caches are not reused
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80  # Megatron's rule
_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


# ------------------------------------------------------------------------------------------ indices


def num_epochs_needed(tokens_per_epoch: int, num_samples: int | None, seq_length: int, extra: int) -> int:
    """Epochs whose tokens cover num_samples samples (each advances seq_length tokens, plus `extra`
    tokens at the very end); 1 when num_samples is None."""
    if num_samples is None or num_samples <= 0:
        return 1
    needed = num_samples * seq_length + extra
    return max(1, -(-needed // tokens_per_epoch))


def separate_final_epoch(
    tokens_per_epoch: int, num_epochs: int, num_samples: int | None, seq_length: int, extra: int
) -> tuple[bool, int]:
    """(separate?, samples before the final epoch): Megatron shuffles the final epoch on its own
    when it contributes fewer than 80% of a full epoch's samples."""
    if num_epochs == 1 or num_samples is None:
        return False, 0
    before = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
    per_epoch = (tokens_per_epoch - extra) // seq_length
    from_final = num_samples - before
    return from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch), before


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final: bool
) -> np.ndarray:
    """The documents tiled over `num_epochs`, shuffled (the final epoch alone when separate)."""
    dtype = np.int32 if documents.size == 0 or int(documents.max()) < 2**31 else np.int64
    if separate_final and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate([first, last])
    index = np.tile(documents.astype(dtype, copy=False), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(
    sequence_lengths: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    extra: int,
    drop_last_partial: bool,
) -> np.ndarray:
    """[samples + 1, 2] int64 rows (position in document_index, token offset) where samples start.

    Vectorised form of Megatron's walk: with the documents laid back to back (ends = running sum of
    their lengths), boundary k sits at token q = k·seq_length. Sample k - 1 reads up to token
    q - 1 + extra, so the boundary is recorded in the document holding that token, at offset
    q - (that document's start): with the extra token it is the document holding q itself, without
    it a sample may end exactly at a document's end (offset == its length), as in Megatron.
    """
    sizes = sequence_lengths[document_index].astype(np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if ends.size else 0
    if total - extra <= 0:
        raise ValueError(f"the documents hold {total} tokens: too few for one sample")
    if drop_last_partial:
        num_samples = (total - extra) // seq_length
    else:
        num_samples = -(-(total - extra) // seq_length)
    q = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # A kept partial last sample ends where the tokens end (Megatron: offset = length - extra).
    np.minimum(q, total - extra, out=q)
    doc = np.searchsorted(ends, q - 1 + extra, side="right")
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = doc
    out[:, 1] = q - (ends[doc] - sizes[doc])
    out[0] = (0, 0)
    return out


def build_shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, total): [0, num_samples) and [num_samples, total) shuffled separately."""
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate([first, last])


# ------------------------------------------------------------------------------------------ samples


def gpt_sample(
    text: np.ndarray,
    seq_length: int,
    eod: int,
    *,
    eod_mask_loss: bool,
    reset_position_ids: bool,
    reset_attention_mask: bool,
) -> dict[str, torch.Tensor]:
    """The batch dict of one sample from its raw tokens (seq_length + 1 with the extra token,
    seq_length without; fewer for a partial last sample, which is padded with id 0 and no loss).

    tokens = text[:S], labels = text[1:S+1] (the label after the last token is unknown without the
    extra token: 0 with no loss, as in Megatron); loss_mask is 0 where the label is padding and,
    with eod_mask_loss, where the *input* is eod; position_ids restart after each eod with
    reset_position_ids; attention_mask ([1, S, S] bool, True = masked) only with reset_attention_mask.
    """
    s = seq_length
    n = int(text.shape[0])
    buf = np.zeros(s + 1, dtype=np.int64)
    buf[:n] = text[: s + 1]
    tokens, labels = buf[:s], buf[1:]
    positions = np.arange(s, dtype=np.int64)
    if n >= s + 1:
        loss_mask = np.ones(s, dtype=np.float32)
        is_eod = tokens == eod
    else:
        loss_mask = (positions + 1 < n).astype(np.float32)
        is_eod = (tokens == eod) & (positions < n)  # padding is never an eod
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    out = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
    }
    if reset_position_ids:
        # Each position minus the start of its document; a document starts after each eod.
        starts_here = np.concatenate(([True], is_eod[:-1]))
        doc_start = np.maximum.accumulate(np.where(starts_here, positions, 0))
        out["position_ids"] = torch.from_numpy(positions - doc_start)
    else:
        out["position_ids"] = torch.from_numpy(positions)
    if reset_attention_mask:
        out["attention_mask"] = _document_causal_mask(is_eod)
    return out


# ------------------------------------------------------------------------------------------ dataset


class GPTDataset(Dataset[dict[str, torch.Tensor]]):
    """Samples of `seq_length` tokens packed from the documents `document_ids` of one indexed dataset.

    `indexed` is an open `IndexedDataset` or its prefix (then it is opened on first need, with
    config.mmap_bin_files: a cache hit needs no index at all until a sample is read). `num_samples`
    None builds one epoch. `cache_dir` overrides where the indices are cached (default: see
    `resolve_cache_dir`); `built_anew` says whether this construction built them or loaded them.
    Returns the same dict as MockGPTDataset. `len()` is every sample of the epochs built, which
    may exceed num_samples (as in Megatron).
    """

    def __init__(
        self,
        indexed: IndexedDataset | str,
        document_ids: np.ndarray,
        num_samples: int | None,
        seq_length: int,
        config: GPTDatasetConfig,
        tokenizer: Tokenizer,
        split: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be > 0, got {seq_length}")
        if isinstance(indexed, str):
            self.prefix, self._indexed = indexed, None
        else:
            self.prefix, self._indexed = str(indexed.prefix), indexed
        self._mmap = bool(config.mmap_bin_files)
        self.documents = np.asarray(document_ids, dtype=np.int64)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seq_length = int(seq_length)
        self.split = split
        self.seed = int(config.random_seed)
        self.extra = int(bool(config.add_extra_token_to_sequence))
        self.eod = int(tokenizer.eod)
        self.eod_mask_loss = bool(config.eod_mask_loss)
        self.reset_position_ids = bool(config.reset_position_ids)
        self.reset_attention_mask = bool(config.reset_attention_mask and config.create_attention_mask)
        self.drop_last_partial = split not in ("validation", "valid") or bool(
            config.drop_last_partial_validation_sequence
        )

        description = {
            "class": type(self).__name__,
            "format": _FORMAT,
            **file_signature(self.prefix),
            "split": split,
            "documents": {
                "count": int(self.documents.size),
                "first": int(self.documents[0]) if self.documents.size else None,
                "last": int(self.documents[-1]) if self.documents.size else None,
                "sha1": hashlib.sha1(self.documents.tobytes()).hexdigest(),
            },
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "random_seed": self.seed,
            "add_extra_token_to_sequence": bool(self.extra),
            "drop_last_partial_sequence": self.drop_last_partial,
        }
        self.description = json.dumps(description, indent=2, sort_keys=True)
        self.description_hash = hashlib.md5(self.description.encode()).hexdigest()
        self.cache_dir = resolve_cache_dir(self.prefix, cache_dir if cache_dir else config.path_to_cache)
        self.built_anew = False
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build()

    # -------------------------------------------------------------------------------- index files

    def _paths(self) -> dict[str, Path]:
        base = f"{self.description_hash}-{type(self).__name__}-{self.split}"
        names = ("description", *_INDEX_NAMES)
        return {n: self.cache_dir / f"{base}-{n}.{'txt' if n == 'description' else 'npy'}" for n in names}

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        paths = self._paths()
        cached = load_cached_indices(paths, _INDEX_NAMES, self.description, self.cache_problem)
        if cached is not None:
            return cached[0], cached[1], cached[2]
        start = time.perf_counter()
        indices = self.build_indices()
        for name, array in zip(_INDEX_NAMES, indices):
            atomic_save(paths[name], array)
        atomic_write_text(paths["description"], self.description)  # written last: marks the set complete
        self.built_anew = True
        logger.info(
            "built %s %s indices for %s: %d samples in %.2f s (cached in %s)",
            type(self).__name__,
            self.split,
            self.prefix,
            indices[1].shape[0] - 1,
            time.perf_counter() - start,
            self.cache_dir,
        )
        return indices

    def _expected_counts(self, lengths: np.ndarray) -> tuple[int, int, int]:
        """(tokens per epoch, epochs, samples) these documents give; ConfigError when they give none."""
        docs = self.documents
        if docs.size and (int(docs.min()) < 0 or int(docs.max()) >= len(lengths)):
            raise ConfigError(
                Problem(
                    self.prefix + ".idx",
                    f"holds {len(lengths)} sequences; the {self.split} split asks for documents "
                    f"{int(docs.min())} to {int(docs.max())}",
                    fix="the cut of the data into splits does not fit this file; rebuild the datasets",
                )
            )
        tokens_per_epoch = int(lengths[docs].sum(dtype=np.int64))
        epochs, samples = 1, 0
        if tokens_per_epoch - self.extra >= 1:  # else no epoch count gives a sample
            epochs = num_epochs_needed(tokens_per_epoch, self.num_samples, self.seq_length, self.extra)
            total = tokens_per_epoch * epochs
            if self.drop_last_partial:
                samples = (total - self.extra) // self.seq_length
            else:
                samples = -(-(total - self.extra) // self.seq_length)
        # No sample is an error unless none was asked for (a blend component of weight 0), but the
        # indices need a token past the extra one even then.
        if tokens_per_epoch - self.extra < 1 or (samples < 1 and self.num_samples != 0):
            need = self.seq_length + self.extra if self.drop_last_partial else 1 + self.extra
            what = f"{docs.size} documents holding {tokens_per_epoch} tokens" if docs.size else "no documents"
            raise ConfigError(
                Problem(
                    self.prefix + ".idx",
                    f"gives the {self.split} split {what}: too few for one sample ({need} tokens at "
                    f"seq_length {self.seq_length})",
                    fix="give the split a larger share of the data (dataset.split), use more data, "
                    "or a shorter seq_length",
                )
            )
        return tokens_per_epoch, epochs, samples

    def cache_problem(self, arrays: tuple[np.ndarray, ...]) -> str | None:
        """What is wrong with cached (document, sample, shuffle) indices for this dataset, or None.

        Checks dtypes, shapes and every value's bounds (vectorized, block by block); the exact
        epoch and sample counts and each sample's offsets only when the indexed dataset is open
        (a cache hit otherwise opens nothing).
        """
        doc, sample, shuffle = arrays
        for name, array, ndim in (
            ("document_index", doc, 1),
            ("sample_index", sample, 2),
            ("shuffle_index", shuffle, 1),
        ):
            if array.dtype.kind not in "iu" or array.ndim != ndim or (ndim == 2 and array.shape[1] != 2):
                want = "[samples + 1, 2]" if ndim == 2 else "1-D"
                return f"{name} is a {array.dtype} array of shape {array.shape}, expected {want} integers"
        n_docs, samples = int(self.documents.size), int(sample.shape[0]) - 1
        if n_docs == 0 or doc.size == 0 or doc.size % n_docs:
            return f"document_index has {doc.size} entries, not whole epochs of {n_docs} documents"
        if samples < 0 or shuffle.size != samples or (samples == 0 and self.num_samples != 0):
            return f"sample_index has {samples} samples and shuffle_index {shuffle.size}"
        if self.num_samples is not None and samples < self.num_samples:
            return f"holds {samples} samples, fewer than the {self.num_samples} asked for"
        # What bounds a sample's offset: each document's length when the index is open, else the
        # .bin's token count.
        bound: np.ndarray | int
        if self._indexed is not None:
            bound = self._indexed.sequence_lengths
            _, epochs, expected = self._expected_counts(bound)
            if doc.size != epochs * n_docs or samples != expected:
                return (
                    f"holds {doc.size // n_docs} epochs and {samples} samples; the data gives "
                    f"{epochs} epochs and {expected} samples"
                )
        else:
            # Without the index, the .idx header and the .bin's size still bound every value: no
            # offset passes the data's token count.
            from viaduct.data.indexed import bin_path, read_header

            dtype, _, _ = read_header(self.prefix)
            bound = os.path.getsize(bin_path(self.prefix)) // dtype.itemsize
        lo, hi = int(self.documents.min()), int(self.documents.max())
        bad = first_bad_row(doc.size, lambda a, b: (doc[a:b] < lo) | (doc[a:b] > hi))
        if bad is not None:
            return f"document_index[{bad}] = {int(doc[bad])} is not one of the split's documents"
        if sample[0, 0] != 0 or sample[0, 1] != 0:
            return f"sample_index starts at {sample[0].tolist()}, not [0, 0]"
        # Room for a sample's last token in each entry of the document index: its length less the
        # extra token. Gathered once per entry when that is fewer than the samples (no larger than
        # the sample index itself), else per block of samples.
        room = None
        if isinstance(bound, np.ndarray) and doc.size <= samples + 1:
            room = bound[np.asarray(doc)]
            room -= self.extra

        def bad_rows(a: int, b: int) -> np.ndarray:
            # Positions never fall and stay in the document index; offsets are >= 0 and leave room
            # for the sample's last token. Row 0 is (0, 0), checked above.
            block = np.array(sample[max(a - 1, 0) : b])  # contiguous: columns of a memmap are strided
            pos, off = block[:, 0], block[:, 1]
            hit = np.zeros(b - a, dtype=np.bool_)
            np.less(pos[1:], pos[:-1], out=hit[len(hit) - len(pos) + 1 :])
            hit |= (pos[-len(hit) :] >= doc.size) | (off[-len(hit) :] < 0)
            if hit.any():
                return hit
            # Positions are valid: index by them.
            rows = pos[-len(hit) :]
            if room is not None:
                limit = room[rows]
            elif isinstance(bound, np.ndarray):
                limit = bound[np.asarray(doc)[rows]] - self.extra
            else:
                limit = bound - self.extra
            hit |= off[-len(hit) :] > limit
            hit[: 1 if a == 0 else 0] = False
            return hit

        bad = first_bad_row(samples + 1, bad_rows)
        if bad is not None:
            return f"sample_index row {bad} = {sample[bad].tolist()} does not point into the documents"
        bad = first_bad_row(samples, lambda a, b: (shuffle[a:b] < 0) | (shuffle[a:b] >= samples))
        if bad is not None:
            return f"shuffle_index[{bad}] = {int(shuffle[bad])} is not a sample of {samples}"
        return None

    def build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document index, sample index, shuffle index), computed from the data (no cache)."""
        lengths = self.indexed.sequence_lengths
        tokens_per_epoch, _, _ = self._expected_counts(lengths)
        epochs = num_epochs_needed(tokens_per_epoch, self.num_samples, self.seq_length, self.extra)
        separate, before_final = separate_final_epoch(
            tokens_per_epoch, epochs, self.num_samples, self.seq_length, self.extra
        )
        rng = np.random.RandomState(self.seed)
        document_index = build_document_index(self.documents, epochs, rng, separate)
        sample_index = build_sample_index(
            lengths, document_index, self.seq_length, self.extra, self.drop_last_partial
        )
        total = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(before_final if separate else total, total, rng)
        return document_index, sample_index, shuffle_index

    # ------------------------------------------------------------------------------------ reading

    @property
    def indexed(self) -> IndexedDataset:
        """The indexed dataset, opened on first use."""
        if self._indexed is None:
            from viaduct.data.indexed import IndexedDataset

            self._indexed = IndexedDataset(self.prefix, mmap=self._mmap)
        return self._indexed

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def tokens_of(self, idx: int) -> np.ndarray:
        """The raw tokens of sample `idx` (after shuffling): seq_length + extra, fewer when partial."""
        if not 0 <= int(idx) < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        try:
            return self._tokens_of(int(idx))
        except IndexError as err:
            # Only cached indices loaded without the data at hand can get here (see cache_problem).
            paths = self._paths()
            raise ConfigError(
                Problem(
                    str(paths["sample_index"]),
                    f"sample {idx} reads outside its documents of {self.prefix} ({err})",
                    fix=f"the cached indices do not match the data; delete {self.cache_dir}/"
                    f"{self.description_hash}-* to rebuild them",
                )
            ) from err

    def _tokens_of(self, idx: int) -> np.ndarray:
        i = int(self.shuffle_index[idx])
        d0, o0 = (int(v) for v in self.sample_index[i])
        d1, o1 = (int(v) for v in self.sample_index[i + 1])
        get = self.indexed.get
        docs = self.document_index
        if d0 == d1:
            return get(int(docs[d0]), offset=o0, length=o1 - o0 + self.extra)
        parts = [get(int(docs[d0]), offset=o0)]
        parts.extend(get(int(docs[d])) for d in range(d0 + 1, d1))
        parts.append(get(int(docs[d1]), offset=0, length=o1 + self.extra))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return gpt_sample(
            self.tokens_of(idx),
            self.seq_length,
            self.eod,
            eod_mask_loss=self.eod_mask_loss,
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask,
        )

    def __getstate__(self) -> dict[str, object]:
        # Workers started by spawn/forkserver re-open the memory maps instead of copying the arrays
        # (the cached index files are complete once __init__ returns).
        state = self.__dict__.copy()
        state["_indexed"] = None
        for name in _INDEX_NAMES:
            state[name] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        paths = self._paths()
        for name in _INDEX_NAMES:
            setattr(self, name, load_index_file(paths[name]))

    def __repr__(self) -> str:
        return (
            f"GPTDataset(prefix={self.prefix!r}, split={self.split!r}, documents={self.documents.size}, "
            f"samples={len(self)}, seq_length={self.seq_length}, seed={self.seed})"
        )
