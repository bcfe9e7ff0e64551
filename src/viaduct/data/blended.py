"""A weighted blend of datasets: sample i of the blend is sample `dataset_sample_index[i]` of
component `dataset_index[i]`.

The order follows the weights closely over *every* prefix of the blend, not only over the whole:
Megatron gets this with a greedy loop (give the next sample to the component whose count lags its
weight the most). We build an equivalent order without a Python loop: the k-th sample of component
d is given the time (k + 1/2) / w_d, and the blend is all samples sorted by time (ties to the lower
component). After n samples each component holds within about one sample of n·w_d (Webster's
apportionment), and within k-th place each component's own samples stay in order, so component d
reads its samples 0, 1, 2, ... The order is deterministic (no randomness: the components shuffle
their own samples).

Indices are cached like the GPT dataset's when a cache directory is given (atomic writes); a
cached file that is unreadable or does not fit the blend (shape, dtype, a component or sample out
of range) is rebuilt with an `IndexCacheWarning`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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

_FORMAT = 1
_INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendComponent(Protocol):
    """What a blend draws from: a map-style dataset of samples that knows its length."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int, /) -> dict[str, torch.Tensor]: ...


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative, finite and not all 0, got {list(weights)}")
    return w / w.sum()


def blending_indices(weights: Sequence[float] | np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of a blend of `size` samples (see module doc)."""
    w = normalize_weights(weights)
    if w.size >= 2**15:
        raise ValueError(f"at most {2**15 - 1} datasets can be blended, got {w.size}")
    if size <= 0:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    # Webster counts stay below w_d·(size + D/2) + 1/2; give each component a few more candidates
    # so the first `size` times never run out of any component.
    extra = w.size / 2 + 2
    caps = [math.ceil(wd * (size + extra)) + 1 if wd > 0 else 0 for wd in w]
    times = np.concatenate([(np.arange(c, dtype=np.float64) + 0.5) / wd for c, wd in zip(caps, w) if c])
    ids = np.concatenate([np.full(c, d, dtype=np.int16) for d, c in enumerate(caps) if c])
    ranks = np.concatenate([np.arange(c, dtype=np.int64) for c in caps if c])
    # Candidates are laid out by component, so a stable sort breaks ties toward the lower component.
    order = np.argsort(times, kind="stable")[:size]
    return ids[order], ranks[order]


def blend_counts(weights: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    """How many samples each component gives to a blend of `size` samples."""
    ids, _ = blending_indices(weights, size)
    return np.bincount(ids, minlength=len(weights)).astype(np.int64)


class BlendedDataset(Dataset[dict[str, torch.Tensor]]):
    """`num_samples` samples drawn from `datasets` in proportion to `weights` (None: to their sizes).

    Each component must hold at least as many samples as the blend takes from it (`blend_counts`);
    the builder sizes them num_samples × weight × (1 + mid_level_dataset_surplus), and at least that.
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
        indices = blending_indices(self.weights, self.num_samples)
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
