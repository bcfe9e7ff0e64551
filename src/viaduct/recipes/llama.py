"""Llama-family pretraining recipes (published shapes; mock data and a null tokenizer by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from viaduct.models import (
    GPTModelProvider,
    Llama2ModelProvider7B,
    Llama3ModelProvider8B,
    Llama32ModelProvider1B,
)
from viaduct.models.gpt.provider import LlamaStyleProvider
from viaduct.recipes.common import PretrainKwargs, apply_recipe_kwargs, pretrain_common
from viaduct.recipes.registry import recipe
from viaduct.training.config import ConfigContainer

if TYPE_CHECKING:
    from typing_extensions import Unpack


def llama_model(**shape: object) -> GPTModelProvider:
    """A plain `GPTModelProvider` with the Llama architecture (RMSNorm, SwiGLU, RoPE, no biases,
    no dropout, untied embeddings) and the given shape; for custom sizes that keep the generic
    `_target_`. The published sizes are classes: `viaduct.models.Llama32ModelProvider1B` ...
    The architecture's values are `LlamaStyleProvider`'s, the base of those classes.
    """
    return GPTModelProvider(**{**LlamaStyleProvider.architecture(), **shape})


@recipe("llama32_1b")
def llama32_1b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 3.2 1B shape (16 layers, 2048 wide, tied embeddings, RoPE scaling factor 32).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    seq_length = 8192  # pretraining context (the published model extends to 128k)
    model = Llama32ModelProvider1B(seq_length=seq_length)
    cfg = pretrain_common(model, name="llama32_1b")
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama32_1b_pretrain_config", default_name="llama32_1b")


@recipe("llama3_8b")
def llama3_8b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 3 8B shape (32 layers, 4096 wide, 14336 FFN, 8 KV groups).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(Llama3ModelProvider8B(), name="llama3_8b")
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama3_8b_pretrain_config", default_name="llama3_8b")


@recipe("llama2_7b")
def llama2_7b_pretrain_config(**kwargs: Unpack[PretrainKwargs]) -> ConfigContainer:
    """Llama 2 7B shape (32 layers, 4096 wide, 11008 FFN, multi-head attention, 4k context).

    Keyword arguments (`train_iters=`, `lr=`, `dir=`, ...): see `viaduct.recipes.common.PretrainKwargs`.
    """
    cfg = pretrain_common(Llama2ModelProvider7B(), name="llama2_7b")
    return apply_recipe_kwargs(cfg, kwargs, recipe="llama2_7b_pretrain_config", default_name="llama2_7b")
