"""Evaluation: the training forward step without gradients, over `eval_iters` batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from viaduct.training.forward_contract import ForwardStepFunc
from viaduct.training.logging.console import perplexity
from viaduct.training.optim import MixedPrecisionOptimizer
from viaduct.training.train_step import MetricAccumulator, forward_backward

__all__ = ["evaluate", "perplexity"]  # perplexity: one definition, kept importable from here


def evaluate(
    forward_step: ForwardStepFunc,
    data_iterator: Iterator[Any],
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    eval_iters: int,
    num_microbatches: int,
) -> dict[str, float]:
    """Mean of each reported metric over `eval_iters` evaluation batches and all data-parallel ranks.

    `[sum, count]` reports are summed over every batch before dividing, so the result is the
    token-weighted mean; the model is put back into training mode afterwards.
    """
    was_training = model.training
    model.eval()
    total = MetricAccumulator()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                batch = forward_backward(
                    forward_step, data_iterator, model, optimizer, num_microbatches, forward_only=True
                )
                for name, value in batch.pairs.items():
                    total.pairs[name] = value if name not in total.pairs else total.pairs[name] + value
                for name, value in batch.scalars.items():
                    mean = value / max(batch.n, 1)
                    total.scalars[name] = mean if name not in total.scalars else total.scalars[name] + mean
                total.n += 1
        reduced = total.reduce()
        values = torch.stack(list(reduced.values())).cpu().tolist() if reduced else []
    finally:
        model.train(was_training)
    return dict(zip(reduced.keys(), values))
