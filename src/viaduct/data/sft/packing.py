"""Packing fine-tuning examples offline into fixed-length sequences, and their on-disk cache.

Each example contributes its shifted triple (tokens = ids[:-1], labels = ids[1:], loss mask) of
L-1 positions, rounded up to `pad_seq_to_mult`, to a pack of `size` positions. Examples are
placed by Megatron Bridge's "first_fit_shuffle": a seeded shuffle, then each goes into the first
pack with room. Because every example brings its own labels, a label never crosses an example
boundary; `position_ids` restart at 0 for each example and the `attention_mask` ([1, S, S], True =
masked) is causal within an example and blocks attention across examples, so a packed sequence
gives the same per-token losses as its examples run alone: packing changes speed, not the result.

The packs of a split are cached as one int32 array [packs, 4, size] (rows: tokens, labels,
loss_mask, segment = the example's index in its pack, -1 for padding) in a `.npy` file, with a
metadata `.json` beside it holding the fingerprint of everything the packs depend on (the source
file's bytes, the tokenizer, the options, the size, the seed) and the SHA-256 of the `.npy`. A
cache file is untrusted: it is loaded with `allow_pickle=False`, checked (checksum, shape, dtype,
ids within the vocabulary, segment layout) and, when stale or damaged, rebuilt with a warning.
Both files are written to a temporary name and renamed, the metadata last, so a run killed while
writing leaves no file that passes as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from viaduct.data.sft.dataset import EpochOrder
from viaduct.data.sft.examples import Example

FORMAT = 1
_ROWS = 4  # tokens, labels, loss_mask, segment
_MAX_METADATA_BYTES = 1 << 20


class PackCacheWarning(UserWarning):
    """A pack cache was stale or damaged and is rebuilt."""


def first_fit_shuffle(lengths: Sequence[int], size: int, seed: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= `size`: a seeded shuffle, then first fit.

    First fit finds the lowest-numbered bin with room through a max segment tree over the bins'
    free space: O(n log n) however many bins.
    """
    order = np.random.default_rng(seed).permutation(len(lengths))
    cap = 1
    while cap < max(1, len(lengths)):
        cap *= 2
    tree = np.zeros(2 * cap, dtype=np.int64)  # max free space per subtree; leaves cap.. are bins
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        if n > size or n < 1:
            raise ValueError(f"example of {n} positions does not fit a pack of {size}")
        if tree[1] >= n:
            node = 1
            while node < cap:
                node = 2 * node if tree[2 * node] >= n else 2 * node + 1
            b = node - cap
        else:
            b = len(bins)
            bins.append([])
            node = cap + b
            tree[node] = size
        bins[b].append(int(i))
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def pack_examples(
    examples: Sequence[Example],
    size: int,
    *,
    seed: int,
    pad_id: int,
    answer_only_loss: bool,
    pad_seq_to_mult: int = 1,
) -> np.ndarray:
    """The int32 [packs, 4, size] array of `examples` packed (see module docstring)."""
    m = max(1, pad_seq_to_mult)
    slots = [min(size, -(-(len(ex) - 1) // m) * m) for ex in examples]
    bins = first_fit_shuffle(slots, size, seed)
    out = np.zeros((len(bins), _ROWS, size), dtype=np.int32)
    out[:, 0, :] = pad_id
    out[:, 3, :] = -1
    for b, members in enumerate(bins):
        at = 0
        for seg, i in enumerate(members):
            ex = examples[i]
            n = len(ex) - 1
            out[b, 0, at : at + n] = ex.ids[:-1]
            out[b, 1, at : at + n] = ex.ids[1:]
            out[b, 2, at : at + n] = ex.answer[1:] if answer_only_loss else 1
            out[b, 3, at : at + slots[i]] = seg  # an example's own padding stays in its segment
            at += slots[i]
    return out


def packed_sample(pack: np.ndarray) -> dict[str, torch.Tensor]:
    """The sample of one [4, size] pack: tokens, labels, loss_mask, position_ids, attention_mask."""
    tokens, labels, loss, seg = (np.asarray(pack[r], dtype=np.int64) for r in range(_ROWS))
    size = tokens.size
    positions = np.arange(size, dtype=np.int64)
    starts = np.concatenate(([True], seg[1:] != seg[:-1]))
    first = np.maximum.accumulate(np.where(starts, positions, 0))
    s = torch.from_numpy(seg)
    visible = torch.ones(size, size, dtype=torch.bool).tril_() & (s[:, None] == s[None, :])
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss.astype(np.float32)),
        "position_ids": torch.from_numpy(positions - first),
        "attention_mask": (~visible).unsqueeze(0),
    }


class PackedSFTDataset(Dataset[dict[str, torch.Tensor]]):
    """`num_samples` packed sequences over the packs of one split, repeated over seeded epochs."""

    def __init__(self, packs: np.ndarray, num_samples: int, *, seed: int, split: str) -> None:
        self.packs = packs
        self.num_samples = int(num_samples)
        self.split = split
        self.order = EpochOrder(len(packs), seed, split)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        return packed_sample(self.packs[self.order(idx)])

    def __repr__(self) -> str:
        return (
            f"PackedSFTDataset(split={self.split!r}, packs={len(self.packs)}, "
            f"size={self.packs.shape[-1]}, num_samples={self.num_samples})"
        )


# ---------------------------------------------------------------------------------------- cache


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_packs(npy: Path, meta: Path, fingerprint: str, size: int, vocab_size: int) -> np.ndarray | None:
    """The cached packs when `npy`/`meta` hold valid packs of `fingerprint`; None (with a warning
    when a cache was there but stale or damaged) otherwise."""
    if not npy.exists() and not meta.exists():
        return None
    problem = _check_cache(npy, meta, fingerprint, size, vocab_size)
    if isinstance(problem, np.ndarray):
        return problem
    warnings.warn(PackCacheWarning(f"pack cache {npy}: {problem}; rebuilding it"), stacklevel=3)
    return None


def _check_cache(npy: Path, meta: Path, fingerprint: str, size: int, vocab_size: int) -> np.ndarray | str:
    try:
        if meta.stat().st_size > _MAX_METADATA_BYTES:
            return f"its metadata {meta} is larger than {_MAX_METADATA_BYTES} bytes"
        info = json.loads(meta.read_bytes())
    except FileNotFoundError:
        return f"its metadata {meta} is missing"
    except (OSError, ValueError, RecursionError) as exc:
        return f"its metadata {meta} cannot be read ({exc})"
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return f"its metadata {meta} is not a viaduct pack index of format {FORMAT}"
    if info.get("fingerprint") != fingerprint:
        return "it was built from other data, tokenizer or options (stale)"
    packs = info.get("packs")
    if not isinstance(packs, int) or packs < 1 or info.get("size") != size:
        return f"its metadata {meta} has no valid pack count and size"
    expected = packs * _ROWS * size * 4
    try:
        actual = npy.stat().st_size
    except OSError:
        return "the .npy file is missing"
    # The .npy header is at most a few hundred bytes; a file far from the expected size is damaged
    # (and is not read into memory at all).
    if not expected <= actual <= expected + 4096:
        return f"the file holds {actual} bytes, not the {expected} (+ header) of {packs} packs of {size}"
    try:
        if file_sha256(npy) != info.get("sha256"):
            return "its checksum does not match the metadata (damaged or replaced)"
        arr = np.load(npy, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # a directory, unreadable, or not a plain array
        return f"it cannot be loaded as a plain array ({exc})"
    if not isinstance(arr, np.ndarray) or arr.dtype != np.int32 or arr.shape != (packs, _ROWS, size):
        shape = getattr(arr, "shape", None)
        return (
            f"it holds {getattr(arr, 'dtype', type(arr).__name__)} {shape}, not int32 {(packs, _ROWS, size)}"
        )
    problem = check_packs(arr, vocab_size)
    return arr if problem is None else problem


def check_packs(arr: np.ndarray, vocab_size: int) -> str | None:
    """Why `arr` is not a valid pack array, or None."""
    tokens, labels, loss, seg = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
    for name, ids in (("token", tokens), ("label", labels)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            return f"it holds {name} ids outside the vocabulary [0, {vocab_size})"
    if not np.isin(loss, (0, 1)).all():
        return "its loss mask holds values other than 0 and 1"
    # Segments: 0, 1, 2, ... each a run, then -1 padding to the end; padding carries no loss.
    pad = seg == -1
    if (loss[pad] != 0).any():
        return "it has loss on padding"
    if (pad[:, :-1] & ~pad[:, 1:]).any():
        return "it has padding before an example"
    step = np.diff(np.where(pad, 0, seg), axis=1)[~pad[:, 1:]]
    if seg[:, 0].min(initial=0) != 0 or ((step != 0) & (step != 1)).any() or seg.min(initial=0) < -1:
        return "its example boundaries are inconsistent"
    return None


def save_packs(arr: np.ndarray, npy: Path, meta: Path, info: dict[str, object]) -> None:
    """Write `arr` to `npy` and `info` (plus checksum) to `meta`, each atomically, metadata last."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    meta.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=npy.name + ".tmp-", dir=npy.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        digest = file_sha256(Path(tmp))
        os.replace(tmp, npy)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    body = json.dumps({**info, "format": FORMAT, "sha256": digest, "packs": int(arr.shape[0])}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=meta.name + ".tmp-", dir=meta.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, meta)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
