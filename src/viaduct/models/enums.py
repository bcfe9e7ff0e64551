"""Enums shared by the model configs (Megatron Core's names and values, so their YAML files load)."""

from __future__ import annotations

import enum


class AttnBackend(enum.Enum):
    """Which attention kernel to run (Megatron's `megatron.core.transformer.enums.AttnBackend`).

    viaduct runs attention through `torch.nn.functional.scaled_dot_product_attention`; the value
    picks its backend: `flash` -> flash attention, `fused` -> cuDNN / memory-efficient,
    `unfused` and `local` -> the math (plain matmul + softmax) path, `auto` -> let PyTorch choose.
    """

    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5
