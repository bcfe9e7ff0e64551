"""Qwen-family pretraining recipes (published shapes; mock data and a null tokenizer by default)."""

from __future__ import annotations

from viaduct.models import Qwen3ModelProvider600M, Qwen25ModelProvider500M
from viaduct.recipes.common import pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer

# Pretraining context of the Qwen recipes (the published models read 32k / 40k tokens).
_SEQ_LENGTH = 4096


@recipe("qwen25_500m")
def qwen25_500m_pretrain_config() -> ConfigContainer:
    """Qwen 2.5 0.5B shape (24 layers, 896 wide, 2 KV groups, QKV bias, tied embeddings)."""
    model = Qwen25ModelProvider500M(seq_length=_SEQ_LENGTH)
    return pretrain_common(model, name="qwen25_500m")


@recipe("qwen3_600m")
def qwen3_600m_pretrain_config() -> ConfigContainer:
    """Qwen 3 0.6B shape (28 layers, 1024 wide, 16 heads of 128, QK norm, tied embeddings)."""
    model = Qwen3ModelProvider600M(seq_length=_SEQ_LENGTH)
    return pretrain_common(model, name="qwen3_600m")
