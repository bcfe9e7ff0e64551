"""Qwen-family pretraining recipes (published shapes; mock data and a null tokenizer by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viaduct.models import Qwen3ModelProvider600M, Qwen25ModelProvider500M
from viaduct.recipes.common import PretrainKwargs, apply_recipe_kwargs, pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Pretraining context of the Qwen recipes (the published models read 32k / 40k tokens).
_SEQ_LENGTH = 4096


@recipe("qwen25_500m")
def qwen25_500m_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Qwen 2.5 0.5B shape (24 layers, 896 wide, 2 KV groups, QKV bias, tied embeddings).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(Qwen25ModelProvider500M(seq_length=_SEQ_LENGTH), name="qwen25_500m")
    return apply_recipe_kwargs(cfg, kwargs, recipe="qwen25_500m_pretrain_config", default_name="qwen25_500m")


@recipe("qwen3_600m")
def qwen3_600m_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Qwen 3 0.6B shape (28 layers, 1024 wide, 16 heads of 128, QK norm, tied embeddings).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(Qwen3ModelProvider600M(seq_length=_SEQ_LENGTH), name="qwen3_600m")
    return apply_recipe_kwargs(cfg, kwargs, recipe="qwen3_600m_pretrain_config", default_name="qwen3_600m")
