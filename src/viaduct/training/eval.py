"""Evaluation: the training forward step without gradients, over `eval_iters` batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from viaduct.training.forward_contract import ForwardStepFunc
from viaduct.training.logging.console import perplexity
from viaduct.training.optim import MixedPrecisionOptimizer
from viaduct.training.train_step import MetricAccumulator, forward_backward

if TYPE_CHECKING:
    from viaduct.distributed.pipeline import Pipeline

__all__ = ["evaluate", "perplexity"]  # perplexity: one definition, kept importable from here


def evaluate(
    forward_step: ForwardStepFunc,
    data_iterator: Iterator[Any],
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    eval_iters: int,
    num_microbatches: int,
    *,
    pipeline: Pipeline | None = None,
    micro_batch_size: int = 1,
) -> dict[str, float]:
    """Mean of each reported metric over `eval_iters` evaluation batches and all data-parallel ranks.

    `[sum, count]` reports are summed over every batch before dividing, so the result is the
    token-weighted mean; the model is put back into training mode afterwards. With `pipeline`, its
    stages run the batches forward and the last stage's result is returned on every stage.
    """
    was_training = model.training
    model.eval()
    total = MetricAccumulator()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                if pipeline is not None:
                    batch = pipeline.forward_only(
                        forward_step, data_iterator, num_microbatches, micro_batch_size
                    )
                else:
                    batch = forward_backward(
                        forward_step, data_iterator, model, optimizer, num_microbatches, forward_only=True
                    )
                for name, value in batch.pairs.items():
                    total.pairs[name] = value if name not in total.pairs else total.pairs[name] + value
                for name, value in batch.scalars.items():
                    mean = value / max(batch.n, 1)
                    total.scalars[name] = mean if name not in total.scalars else total.scalars[name] + mean
                total.n += 1
        reduced = total.reduce() if pipeline is None else pipeline.reduce(total)
        values = torch.stack(list(reduced.values())).cpu().tolist() if reduced else []
    finally:
        model.train(was_training)
    result = dict(zip(reduced.keys(), values))
    return result if pipeline is None else pipeline.share_from_last_stage([result])[0]
