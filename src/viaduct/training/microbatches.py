"""Micro-batches per step: global batch / (micro batch × data-parallel size), with optional ramp-up.

`train.rampup_batch_size = [start, increment, samples]` grows the global batch from `start` by
`increment` at even intervals over the first `samples` consumed samples, then stays at
`train.global_batch_size` (Megatron's ramp-up calculator). With `decrease_batch_size_if_needed`
a batch that does not divide evenly is rounded down to a multiple of micro batch × data-parallel.
"""

from __future__ import annotations


def ramp_batches(global_batch_size: int, rampup_batch_size: list[int] | None) -> list[int]:
    """Every global batch size a run goes through, in order: the ramp-up's steps, then the final one
    (before rounding to whole micro-batches)."""
    if not rampup_batch_size:
        return [global_batch_size]
    start, increment = rampup_batch_size[0], rampup_batch_size[1]
    increments = (global_batch_size - start) // increment if increment > 0 else 0
    steps = [min(global_batch_size, start + k * increment) for k in range(max(0, increments) + 1)]
    return sorted(set(steps) | {global_batch_size})


def rounded_batch(batch: int, per_microbatch: int, decrease_if_needed: bool) -> int:
    """`batch` rounded down to whole micro-batches with decrease_batch_size_if_needed (at least one),
    else as it is (validate() refuses a batch that does not divide)."""
    return max(per_microbatch, batch - batch % per_microbatch) if decrease_if_needed else batch


class MicroBatchCalculator:
    """Current global batch size and micro-batch count, updated from consumed samples."""

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        rampup_batch_size: list[int] | None = None,
        decrease_batch_size_if_needed: bool = False,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.rampup = list(rampup_batch_size) if rampup_batch_size else None
        self.decrease_if_needed = decrease_batch_size_if_needed
        self.current_global_batch_size = global_batch_size
        self.num_microbatches = 0
        self.update(0)

    @property
    def per_microbatch(self) -> int:
        """Samples in one micro-batch over all data-parallel ranks."""
        return self.micro_batch_size * self.data_parallel_size

    def _rampup_batch(self, consumed_samples: int) -> int:
        start, increment, samples = self.rampup  # type: ignore[misc]
        increments = (self.global_batch_size - start) // increment
        if increments <= 0 or consumed_samples > samples:
            return self.global_batch_size
        per_increment = samples / increments
        return min(self.global_batch_size, start + int(consumed_samples / per_increment) * increment)

    def update(self, consumed_samples: int) -> bool:
        """Recompute for `consumed_samples`; returns whether the micro-batch count changed."""
        batch = self._rampup_batch(consumed_samples) if self.rampup else self.global_batch_size
        batch = rounded_batch(batch, self.per_microbatch, self.decrease_if_needed)
        if batch % self.per_microbatch:
            raise ValueError(
                f"global batch {batch} is not divisible by micro batch × data-parallel size "
                f"({self.micro_batch_size} × {self.data_parallel_size}); validate() should have caught this"
            )
        before = self.num_microbatches
        self.current_global_batch_size = batch
        self.num_microbatches = batch // self.per_microbatch
        return before not in (0, self.num_microbatches)
