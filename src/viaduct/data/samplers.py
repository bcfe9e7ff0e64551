"""Batch samplers that know how many samples were consumed, so a resumed run sees the same batches.

Megatron's semantics: the run walks a *global* order of sample indices in global micro-batches of
`micro_batch_size × dp_size` indices; data-parallel rank r takes its slice `[r·mbs, (r+1)·mbs)`.
`consumed_samples` counts global samples (the loop's consumed_train_samples), so starting a sampler
at N consumed samples yields exactly what an uninterrupted run yields after its first N samples.

- `PretrainingSampler` ("single", and "batch" for fine-tuning data, whose dataset shuffles its own
  epochs and whose collate function pads each micro-batch): one pass over `[0, total_samples)` in order.
- `PretrainingRandomSampler` ("cyclic"): epochs over the dataset, reshuffled each epoch from
  `seed + epoch`; infinite unless `total_samples` bounds it.

They yield lists of indices: use them as a DataLoader's `batch_sampler`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from viaduct.config import ConfigError, Problems
from viaduct.training.config.dataset import dataloader_type_problem


def _check_common(consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    # Programming errors of the caller (the loop passes validated values), hence ValueError.
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")


class PretrainingSampler:
    """One ordered pass over `[0, total_samples)`, resuming at `consumed_samples` ("single")."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ) -> None:
        _check_common(consumed_samples, micro_batch_size, dp_rank, dp_size)
        if total_samples < 0:
            raise ValueError(f"total_samples must be >= 0, got {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last

    def _bounds(self) -> tuple[int, int]:
        """[start, end) of the full global micro-batches still to come."""
        step = self.micro_batch_size * self.dp_size
        start = min(self.consumed_samples, self.total_samples)
        return start, start + (self.total_samples - start) // step * step

    def __len__(self) -> int:
        """Micro-batches this rank yields."""
        start, end = self._bounds()
        n = (end - start) // (self.micro_batch_size * self.dp_size)
        tail_start = end + self.dp_rank * self.micro_batch_size
        return n + int(not self.drop_last and tail_start < self.total_samples)

    def __iter__(self) -> Iterator[list[int]]:
        mbs = self.micro_batch_size
        step = mbs * self.dp_size
        start, end = self._bounds()
        for first in range(start + self.dp_rank * mbs, end, step):
            yield list(range(first, first + mbs))
        if not self.drop_last:
            # The partial last global batch: the ranks whose slice is non-empty get a short batch.
            first = end + self.dp_rank * mbs
            if first < self.total_samples:
                yield list(range(first, min(first + mbs, self.total_samples)))


class PretrainingRandomSampler:
    """Reshuffled epochs over a dataset of `dataset_size` samples ("cyclic"), resumable and infinite.

    Each epoch covers the largest multiple of `micro_batch_size × dp_size` samples (the rest of the
    dataset is left out of that epoch, as in Megatron) in an order drawn from a torch.Generator
    seeded with `seed + epoch`:

    - `data_sharding=True` (Megatron's bucket scheme): rank r owns the contiguous bucket
      `[r·B, (r+1)·B)`, B = epoch size / dp_size, and walks a permutation of it, so each rank reads
      only its own part of the data;
    - `data_sharding=False`: one permutation of the whole epoch, cut into global micro-batches of
      which rank r takes slice r (the union over ranks is the single-rank order).

    `total_samples` (global samples, counted from the start of the run) stops the iteration when
    set; None cycles forever.
    """

    def __init__(
        self,
        dataset_size: int,
        total_samples: int | None,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        data_sharding: bool,
        seed: int = 0,
    ) -> None:
        _check_common(consumed_samples, micro_batch_size, dp_rank, dp_size)
        step = micro_batch_size * dp_size
        if dataset_size < step:
            raise ValueError(
                f"the dataset ({dataset_size} samples) is smaller than one global micro-batch "
                f"(micro batch × data-parallel size = {micro_batch_size} × {dp_size} = {step})"
            )
        if consumed_samples % step:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a multiple of micro batch × data-parallel "
                f"size ({step}) to resume a cyclic sampler"
            )
        self.dataset_size = dataset_size
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.data_sharding = data_sharding
        self.seed = seed
        self.epoch_samples = dataset_size - dataset_size % step

    def _epoch_order(self, epoch: int, offset: int) -> torch.Tensor:
        """This rank's indices for `epoch` from global offset `offset` on, as [micro-batches, mbs]."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        mbs, dp = self.micro_batch_size, self.dp_size
        if self.data_sharding:
            bucket = self.epoch_samples // dp
            perm = torch.randperm(bucket, generator=g)
            # Every rank walks the same permutation of its own bucket; offset // dp of each is used.
            return (self.dp_rank * bucket + perm[offset // dp :]).view(-1, mbs)
        perm = torch.randperm(self.epoch_samples, generator=g)
        return perm[offset:].view(-1, dp, mbs)[:, self.dp_rank]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        consumed = self.consumed_samples
        while True:
            epoch, offset = divmod(consumed, self.epoch_samples)
            for batch in self._epoch_order(epoch, offset):
                if self.total_samples is not None and consumed + step > self.total_samples:
                    return
                consumed += step
                yield batch.tolist()


def check_dataloader_type(dataloader_type: str | None, variable_length: bool = False) -> str:
    """The sampler kind for training: None means "single" (Megatron's default); "batch" only for
    datasets of variable-length samples (`variable_length`); others not built yet."""
    problem = dataloader_type_problem(dataloader_type, variable_length)
    if problem is not None:  # validate() refuses it first; this guards callers that skip validation
        p = Problems()
        p.add("dataset.dataloader_type", problem[0], dataloader_type, fix=problem[1])
        raise ConfigError(p.items)
    return "single" if dataloader_type is None else dataloader_type
