"""Fine-tuning datasets: examples repeated over seeded epochs, and the padding collate function.

`SFTDataset` holds `num_samples` samples made of a split's examples: sample i is example
`perm_e[i mod n]` of epoch `e = i // n`, each epoch's permutation drawn from (seed, split, epoch),
so a run of any length has samples (as Megatron Bridge repeats the data over epochs) and any sample
is computed alone (workers and resumed runs agree). A sample has the example's own length:

    tokens = ids[:-1], labels = ids[1:], loss_mask = answer[1:] (all 1 without answer_only_loss),
    position_ids = 0..L-2

`PadCollate` pads the samples of a micro-batch to a common length (the longest, rounded up to the
multiple the run needs, or the fixed seq_length): padding tokens are the pad id, labels 0 and
loss_mask 0, so padding never counts; causal attention keeps real tokens from seeing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from viaduct.data.sft.examples import Example

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


class EpochOrder:
    """Sample i -> item index: epochs over `n` items, each in a permutation seeded by (seed, split, epoch)."""

    def __init__(self, n: int, seed: int, split: str) -> None:
        if n < 1:
            raise ValueError("EpochOrder needs at least one item")
        self.n = n
        self.seed = int(seed)
        self.split_id = SPLIT_IDS[split]
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, i: int) -> int:
        epoch, within = divmod(int(i), self.n)
        perm = self._cache.get(epoch)
        if perm is None:
            if len(self._cache) > 4:  # samples are read in order: old epochs are not needed again
                self._cache.clear()
            perm = np.random.default_rng((self.seed, self.split_id, epoch)).permutation(self.n)
            self._cache[epoch] = perm
        return int(perm[within])


class SFTDataset(Dataset[dict[str, torch.Tensor]]):
    """`num_samples` variable-length samples over the examples of one split (see module docstring)."""

    def __init__(
        self, examples: Sequence[Example], num_samples: int, *, seed: int, split: str, answer_only_loss: bool
    ) -> None:
        self.examples = list(examples)
        self.num_samples = int(num_samples)
        self.split = split
        self.answer_only_loss = answer_only_loss
        self.order = EpochOrder(len(self.examples), seed, split)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        return example_sample(self.examples[self.order(idx)], self.answer_only_loss)

    def __repr__(self) -> str:
        return (
            f"SFTDataset(split={self.split!r}, examples={len(self.examples)}, num_samples={self.num_samples})"
        )


def example_sample(ex: Example, answer_only_loss: bool) -> dict[str, torch.Tensor]:
    """The unpadded sample of one example: inputs and labels are its ids shifted by one."""
    ids = torch.from_numpy(ex.ids)
    n = ids.numel() - 1
    mask = ex.answer[1:] if answer_only_loss else np.ones(n, dtype=bool)
    return {
        "tokens": ids[:-1].clone(),
        "labels": ids[1:].clone(),
        "loss_mask": torch.from_numpy(mask.astype(np.float32)),
        "position_ids": torch.arange(n, dtype=torch.int64),
    }


def pad_multiple(pad_seq_to_mult: int, tp: int, cp: int, sequence_parallel: bool) -> int:
    """The multiple a padded micro-batch's length must be: pad_seq_to_mult, 2·cp under context
    parallelism (each rank takes two mirrored chunks), tp under sequence parallelism (the sequence is
    split over tensor-parallel ranks)."""
    m = max(1, pad_seq_to_mult)
    if cp > 1:
        m = math.lcm(m, 2 * cp)
    if sequence_parallel and tp > 1:
        m = math.lcm(m, tp)
    return m


class PadCollate:
    """collate_fn padding a micro-batch's samples to one length (a picklable object, for workers).

    `fixed_length`: pad to this length always (pad_to_max_length); else to the longest sample
    rounded up to `multiple`. Padding: tokens `pad_id`, labels 0, loss_mask 0, position ids going on
    counting, attention_mask (when samples carry one) masked.
    """

    def __init__(self, pad_id: int, multiple: int = 1, fixed_length: int | None = None) -> None:
        self.pad_id = int(pad_id)
        self.multiple = max(1, int(multiple))
        self.fixed_length = fixed_length

    def length(self, longest: int) -> int:
        if self.fixed_length is not None:
            return max(self.fixed_length, longest)
        return -(-longest // self.multiple) * self.multiple

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from viaduct.data.loaders import collate_samples

        s = self.length(max(int(x["tokens"].numel()) for x in samples))
        padded = [self._pad(x, s) for x in samples]
        return collate_samples(padded)

    def _pad(self, x: dict[str, torch.Tensor], s: int) -> dict[str, torch.Tensor]:
        n = int(x["tokens"].numel())
        extra = s - n
        if extra == 0:
            return x
        out = dict(x)
        out["tokens"] = torch.cat([x["tokens"], x["tokens"].new_full((extra,), self.pad_id)])
        out["labels"] = torch.cat([x["labels"], x["labels"].new_zeros(extra)])
        out["loss_mask"] = torch.cat([x["loss_mask"], x["loss_mask"].new_zeros(extra)])
        if "position_ids" in x:
            last = int(x["position_ids"][-1]) + 1 if n else 0
            out["position_ids"] = torch.cat([x["position_ids"], torch.arange(last, last + extra)])
        if "attention_mask" in x:
            mask = torch.ones(1, s, s, dtype=torch.bool)
            mask[:, :n, :n] = x["attention_mask"]
            # Padding attends to itself so no row is fully masked (a softmax of -inf only is NaN).
            mask[:, n:, n:] = ~torch.ones(extra, extra, dtype=torch.bool).tril_()
            out["attention_mask"] = mask
        return out
