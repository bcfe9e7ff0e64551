"""The default forward step for GPT models (`pretrain(cfg, forward_step)`).

Reads one micro-batch (tokens, labels, loss_mask, position_ids and, for document masking,
attention_mask), runs the model with labels so it returns per-token losses, and reports the
masked loss as `{"lm loss": [sum, count]}`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from viaduct.training.state import GlobalState


def get_batch(
    data_iterator: Iterator[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, torch.Tensor]:
    """The next micro-batch, moved to `device` (asynchronously from pinned memory)."""
    return move_batch(next(data_iterator), device)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`batch` on `device` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked sum of the per-token losses, the token count, and the `lm loss` report."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach()
    report = torch.stack([loss.detach(), num_tokens])
    return loss, num_tokens, {"lm loss": report}


def forward_step(
    state: GlobalState, data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Any]:
    """Run `model` on the next micro-batch; returns (per-token losses, loss function)."""
    batch = get_batch(data_iterator, state.device)
    output = model(
        batch["tokens"],
        batch.get("position_ids"),
        batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, functools.partial(loss_func, batch["loss_mask"])
