"""The forward step of T5 models (`pretrain(cfg)` picks it for a `T5ModelProvider`).

Reads one micro-batch of the span-corruption datasets (`text_enc`, `text_dec`, `labels`,
`loss_mask`, `enc_mask`, `dec_mask`, `enc_dec_mask`: `viaduct.data.t5_dataset`), runs the
encoder-decoder with labels so that it returns per-token losses of the decoder, and reports the
masked loss as `{"lm loss": [sum, count]}` with the GPT step's loss function.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from viaduct.training.gpt_step import get_batch, loss_func
from viaduct.training.state import GlobalState


def forward_step(
    state: GlobalState, data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Any]:
    """Run the T5 `model` on the next micro-batch; returns (per-token decoder losses, loss function)."""
    batch = get_batch(data_iterator, state.device)
    output = model(
        batch["text_enc"],
        batch["text_dec"],
        batch["enc_mask"],
        batch["dec_mask"],
        batch["enc_dec_mask"],
        labels=batch["labels"],
    )
    return output, functools.partial(loss_func, batch["loss_mask"])
