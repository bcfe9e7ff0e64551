"""The forward step of T5 models (`pretrain(cfg)` picks it for a `T5ModelProvider`).

Reads one micro-batch of the span-corruption datasets (`text_enc`, `text_dec`, `labels`,
`loss_mask`, `enc_mask`, `dec_mask`, `enc_dec_mask`: `viaduct.data.t5_dataset`), runs the
encoder-decoder with labels so that it returns per-token losses of the decoder, and reports the
masked loss as `{"lm loss": [sum, count]}` with the GPT step's loss function.

The decoder's padding mask is left out (the decoder then attends causally only, the attention's
fast path) when the batch shows, on the host, that it changes no loss: every row is real tokens
followed by padding, and the loss mask is zero on the padding. A real position then never sees a
padded one (those all come later), and what the padded positions compute reaches no loss.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from viaduct.training.gpt_step import loss_func, move_batch
from viaduct.training.state import GlobalState


def forward_step(
    state: GlobalState, data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Any]:
    """Run the T5 `model` on the next micro-batch; returns (per-token decoder losses, loss function)."""
    host = next(data_iterator)
    causal_only = causal_covers_padding(host["dec_mask"], host["loss_mask"])
    batch = move_batch(host, state.device)
    output = model(
        batch["text_enc"],
        batch["text_dec"],
        batch["enc_mask"],
        None if causal_only else batch["dec_mask"],
        batch["enc_dec_mask"],
        labels=batch["labels"],
    )
    return output, functools.partial(loss_func, batch["loss_mask"])


def causal_covers_padding(dec_mask: torch.Tensor, loss_mask: torch.Tensor) -> bool:
    """Whether causal attention alone gives the decoder the same losses as with its padding mask
    `dec_mask` [batch, seq] (True = real token): each row is real tokens then padding only, and
    `loss_mask` is zero on the padding. Answered on the host only (False for device tensors: the
    check would wait for the device)."""
    on_host = dec_mask.device.type == "cpu" and loss_mask.device.type == "cpu"
    if not on_host or dec_mask.dim() != 2 or loss_mask.shape != dec_mask.shape:
        return False  # the model and the loss report what is wrong with other shapes
    real = dec_mask.bool()
    suffix = not bool((real[:, 1:] & ~real[:, :-1]).any())
    return suffix and not bool(loss_mask[~real].any())
