"""The key/value cache of generation: `KVCache`, preallocated once per generation call.

Each attention layer gets keys and values [batch, kv_heads, max_length, head_dim] in the model's dtype
on its device (grouped-query attention stores only the KV heads). A prefill pass writes the prompts'
slots, each decode step one slot more; the attention of the new tokens reads every slot, masked by
`attention_mask`. A layer that keeps another state makes its own with `new_cache` (a Mamba layer: its
scan state and last convolution inputs, see `viaduct.models.mamba.mixer.MambaCache`; an MLP layer:
nothing).

Prompts of different lengths share one cache by left padding: row r's prompt starts at slot
`pad[r]`, so every row's next token goes to the same slot and a decode step has one static shape.
The padding slots are masked out as keys, and a row's positions (rotary or learned) count from its
first real token (slot - pad[r]), so each row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from viaduct.models.common.transformer import LayerCache

if TYPE_CHECKING:
    from viaduct.models.gpt.model import GPTModel


class KVCache:
    """Keys and values of every layer of `model` for `batch_size` rows and `max_length` slots.

    `pad_lengths`: the left padding of each row (slots before its first real token); default none.
    `dtype` / `device`: default the model's parameters'.
    """

    def __init__(
        self,
        model: GPTModel,
        batch_size: int,
        max_length: int,
        *,
        pad_lengths: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not (model.pre_process and model.post_process):
            raise ValueError("a KV cache needs the whole model, not one pipeline stage")
        if batch_size < 1 or max_length < 1:
            raise ValueError(
                f"KVCache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}"
            )
        cfg = model.config
        assert cfg.kv_channels is not None and cfg.num_query_groups is not None, "finalize() the config first"
        weight = model.output_weight()
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        self.batch_size, self.max_length = batch_size, max_length
        pads = [0] * batch_size if pad_lengths is None else list(pad_lengths)
        if len(pads) != batch_size or any(not 0 <= p < max_length for p in pads):
            raise ValueError(f"pad_lengths must be {batch_size} values in [0, {max_length}), got {pads}")
        self.pad = torch.tensor(pads, dtype=torch.long, device=device)
        """Left padding of each row [batch] (int64)."""
        self.slots = torch.arange(max_length, device=device)
        self.key_valid = self.slots[None, :] >= self.pad[:, None]
        """[batch, max_length] bool: False on each row's padding slots."""
        shape = (batch_size, cfg.num_query_groups, max_length, cfg.kv_channels)
        self.layers: list[LayerCache] = []
        """One cache per layer the model holds, in order: (keys, values) for an attention layer."""
        for layer in model.decoder.layers.values():
            new_cache = getattr(layer, "new_cache", None)
            if new_cache is not None:
                self.layers.append(new_cache(batch_size, self.key_valid, dtype=dtype, device=device))
            else:
                # Zeros, not empty: a masked-out slot's value still meets a zero probability in
                # probs @ v, and 0 * NaN (uninitialised memory) would be NaN.
                self.layers.append(
                    (
                        torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device),
                    )
                )
        self.window = cfg.window_size
        self.max_position = model.seq_length - 1

    @property
    def nbytes(self) -> int:
        """Memory the layers' caches take."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, tuple):
                total += layer[0].nbytes + layer[1].nbytes
            elif layer is not None:
                total += layer.nbytes
        return total

    def position_ids(self, cache_position: torch.Tensor) -> torch.Tensor:
        """Positions [batch, seq] of the tokens at slots `cache_position` [seq]: slot minus the row's
        padding. Clamped to [0, seq_length): padding slots, and the slots a finished row still fills while
        longer-running rows of its batch generate, compute outputs that nothing reads."""
        return (cache_position[None, :] - self.pad[:, None]).clamp(0, self.max_position)

    def attention_mask(self, cache_position: torch.Tensor) -> torch.Tensor:
        """[batch, 1, seq, max_length] bool, True = may attend, for queries at slots `cache_position`.

        Causal over slots (slots after the query are not written yet), never a padding key, and within
        the sliding window when the model has one. A padding query attends to itself alone, so that no
        row of the softmax is empty (an all-masked row is NaN in some kernels).
        """
        q = cache_position[:, None]
        k = self.slots[None, :]
        allowed = k <= q
        if self.window is not None and self.window[0] >= 0:
            allowed = allowed & (q - k <= self.window[0])
        allowed = (allowed[None] & self.key_valid[:, None, :]) | (k == q)[None]
        return allowed[:, None]
