"""A weighted blend of datasets: sample i of the blend is sample `dataset_sample_index[i]` of
component `dataset_index[i]`.

The order is Megatron-Core's, sample for sample: for each sample i, the component whose error
weight·max(i, 1) - (samples it has given so far) is largest gives its next sample, ties going to
the lower component. The errors are computed in float64 exactly as Megatron's compiled helper does,
so even ties that rounding decides fall the same way. The order is deterministic (no randomness:
the components shuffle their own samples).

A Python loop over millions of samples is too slow, so `blending_indices` cuts the blend into
blocks and steps every block at once (numpy across blocks, one Python step per sample of a block).
A block's starting counts are guessed first (each component's share of the samples before it);
then, as long as some block started from counts that differ from where the block before it ended,
those blocks run again from the right counts. The greedy rule pulls a wrong start back onto the
true path within a few samples, so this settles after two or three rounds; and since the first
block starts from the true (all zero) counts, the settled result is the greedy order exactly.

Indices are cached like the GPT dataset's when a cache directory is given (atomic writes); a
cached file that is unreadable or does not fit the blend (shape, dtype, a component or sample out
of range) is rebuilt with an `IndexCacheWarning`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from viaduct.data.index_cache import (
    atomic_save,
    atomic_write_text,
    first_bad_row,
    load_cached_indices,
    load_index_file,
)

logger = logging.getLogger(__name__)

_FORMAT = 2  # the greedy (Megatron) order: caches of the earlier sorted order are not reused
_INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendComponent(Protocol):
    """What a blend draws from: a map-style dataset of samples that knows its length."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int, /) -> dict[str, torch.Tensor]: ...


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """`weights` / their sum, in float64 (Megatron-Core's `normalize`, bit for bit)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative, finite and not all 0, got {list(weights)}")
    return w / np.sum(w)


def blending_indices(weights: Sequence[float] | np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of a blend of `size` samples (see module doc),
    `weights` normalized first (as Megatron's BlendedDataset does)."""
    return greedy_blending_indices(normalize_weights(weights), size)


def greedy_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-Core's `build_blending_indices` for `weights` used as they are (normally summing to 1:
    normalizing again could change their last bits, and so the order)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"blend weights must be a non-empty list, got {list(weights)}")
    if w.size >= 2**15:
        raise ValueError(f"at most {2**15 - 1} datasets can be blended, got {w.size}")
    size = int(size)
    if size <= 0:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    if np.any(w == 0) and np.any(w > 0):
        # Megatron refuses a weight of 0; here such a component is left out of the greedy rule,
        # which would otherwise pick it on an early tie.
        used = np.flatnonzero(w > 0)
        ids, taken = greedy_blending_indices(w[used], size)
        return used[ids].astype(np.int16), taken
    n_datasets = w.size
    # Blocks: enough of them that each numpy step does real work, few enough that a block is long
    # compared with the few samples a wrong start needs to rejoin the greedy path.
    n_blocks = max(1, min(size // 256, max(64, (1 << 16) // n_datasets)))
    length = -(-size // n_blocks)
    starts = np.arange(n_blocks, dtype=np.int64) * length

    # Guess each block's starting counts: each component's share of the samples before the block.
    expected = np.outer(np.maximum(starts, 1).astype(np.float64), w)
    guess = np.floor(expected)
    short = starts - guess.sum(axis=1)  # samples the floors leave out, given to the largest remainders
    order = np.argsort(-(expected - guess), axis=1, kind="stable")
    ranks = np.argsort(order, axis=1, kind="stable")
    guess += ranks < short[:, None]
    guess[0] = 0.0  # the first block starts from the true counts

    picks = np.empty((n_blocks, length), dtype=np.int16)
    taken = np.empty((n_blocks, length), dtype=np.int64)
    start_counts = guess
    end_counts = np.empty_like(guess)
    todo = np.arange(n_blocks)
    while todo.size:
        end_counts[todo] = _run_blocks(w, starts[todo], start_counts[todo], length, picks, taken, todo)
        # A block is settled when it started where the block before it ended.
        wrong = np.flatnonzero((start_counts[1:] != end_counts[:-1]).any(axis=1)) + 1
        start_counts[wrong] = end_counts[wrong - 1]
        todo = wrong
    return picks.reshape(-1)[:size].copy(), taken.reshape(-1)[:size].copy()


def _run_blocks(
    w: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    length: int,
    picks: np.ndarray,
    taken: np.ndarray,
    rows: np.ndarray,
) -> np.ndarray:
    """Step the blocks `rows` (first samples `starts`, counts so far `counts`) through `length`
    samples of the greedy rule; writes their picks into picks/taken and returns their end counts."""
    counts = counts.copy()
    block = np.arange(rows.size)
    for j in range(length):
        # Megatron's error, operation for operation: weight × max(i, 1) - count, all in float64.
        t = np.maximum(starts + j, 1).astype(np.float64)
        error = t[:, None] * w[None, :]
        error -= counts
        pick = error.argmax(axis=1)  # the first of equal maxima: ties go to the lower component
        picks[rows, j] = pick
        taken[rows, j] = counts[block, pick]
        counts[block, pick] += 1.0
    return counts


def blend_counts(weights: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    """How many samples each component gives to a blend of `size` samples."""
    ids, _ = blending_indices(weights, size)
    return np.bincount(ids, minlength=len(weights)).astype(np.int64)


class BlendedDataset(Dataset[dict[str, torch.Tensor]]):
    """`num_samples` samples drawn from `datasets` in proportion to `weights` (None: to their sizes).

    `weights` are normalized (Megatron normalizes them here too, after its builder already did: the
    same two divisions keep the same bits). Each component must hold at least as many samples as
    the blend takes from it (`blend_counts`); the builder sizes them as Megatron's builder does.
    `seed` enters the cache key only (the order itself has no randomness).
    """

    def __init__(
        self,
        datasets: Sequence[BlendComponent],
        weights: Sequence[float] | None,
        num_samples: int,
        seed: int,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not datasets:
            raise ValueError("a blend needs at least one dataset")
        self.datasets = list(datasets)
        sizes = [len(d) for d in self.datasets]
        raw = list(weights) if weights is not None else sizes
        if len(raw) != len(self.datasets):
            raise ValueError(f"{len(self.datasets)} datasets but {len(raw)} weights")
        self.weights = normalize_weights(raw)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        description = {
            "class": type(self).__name__,
            "format": _FORMAT,
            "datasets": [getattr(d, "description_hash", repr(d)) for d in self.datasets],
            "weights": [float(x) for x in self.weights],
            "num_samples": self.num_samples,
            "seed": self.seed,
        }
        self.description = json.dumps(description, indent=2, sort_keys=True)
        self.description_hash = hashlib.md5(self.description.encode()).hexdigest()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.built_anew = False
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self.dataset_index, self.dataset_sample_index = self._load_or_build()

        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        short = [(i, int(c), n) for i, (c, n) in enumerate(zip(counts, sizes)) if c > n]
        if short:
            text = ", ".join(f"component {i} needs {c} samples but has {n}" for i, c, n in short)
            raise ValueError(f"blend of {self.num_samples} samples runs short: {text}")

    def _paths(self) -> dict[str, Path] | None:
        if self.cache_dir is None:
            return None
        base = f"{self.description_hash}-{type(self).__name__}"
        paths = {n: self.cache_dir / f"{base}-{n}.npy" for n in _INDEX_NAMES}
        paths["description"] = self.cache_dir / f"{base}-description.txt"
        return paths

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray]:
        paths = self._paths()
        if paths is not None:
            cached = load_cached_indices(paths, _INDEX_NAMES, self.description, self.cache_problem)
            if cached is not None:
                return cached[0], cached[1]
        indices = greedy_blending_indices(self.weights, self.num_samples)
        self.built_anew = True
        if paths is not None:
            paths["description"].parent.mkdir(parents=True, exist_ok=True)  # the cache directory
            for name, array in zip(_INDEX_NAMES, indices):
                atomic_save(paths[name], array)
            atomic_write_text(paths["description"], self.description)
        return indices

    def cache_problem(self, arrays: tuple[np.ndarray, ...]) -> str | None:
        """What is wrong with cached (dataset index, dataset sample index) for this blend, or None."""
        which, sample = arrays
        for name, array in zip(_INDEX_NAMES, arrays):
            if array.dtype.kind not in "iu" or array.shape != (self.num_samples,):
                return (
                    f"{name} is a {array.dtype} array of shape {array.shape}, expected "
                    f"({self.num_samples},) integers"
                )
        n = len(self.datasets)
        bad = first_bad_row(self.num_samples, lambda a, b: (which[a:b] < 0) | (which[a:b] >= n))
        if bad is not None:
            return f"dataset_index[{bad}] = {int(which[bad])} is not one of the {n} datasets"

        def out_of_range(a: int, b: int) -> np.ndarray:
            return (sample[a:b] < 0) | (sample[a:b] >= self._sizes[np.asarray(which[a:b])])

        bad = first_bad_row(self.num_samples, out_of_range)
        if bad is not None:
            return (
                f"dataset_sample_index[{bad}] = {int(sample[bad])} is not a sample of dataset "
                f"{int(which[bad])} ({int(self._sizes[which[bad]])} samples)"
            )
        return None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]

    def __getstate__(self) -> dict[str, object]:
        # Re-map cached indices in spawned workers rather than pickling the arrays.
        state = self.__dict__.copy()
        if self._paths() is not None:
            for name in _INDEX_NAMES:
                state[name] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        paths = self._paths()
        if paths is not None:
            for name in _INDEX_NAMES:
                setattr(self, name, load_index_file(paths[name]))

    def __repr__(self) -> str:
        w = ", ".join(f"{x:.3g}" for x in self.weights)
        return f"BlendedDataset({len(self.datasets)} datasets, weights=[{w}], num_samples={self.num_samples})"
