"""Recipes: plain functions that return a complete `ConfigContainer`.

from viaduct.recipes import llama32_1b_pretrain_config, get_recipe
cfg = get_recipe("llama32_1b")()
"""

from viaduct.recipes.finetune import (
    llama3_8b_peft_config,
    llama3_8b_sft_config,
    llama32_1b_peft_config,
    llama32_1b_sft_config,
    qwen3_8b_peft_config,
    qwen3_8b_sft_config,
    qwen3_600m_peft_config,
    qwen3_600m_sft_config,
    tiny_gpt_peft_config,
    tiny_gpt_sft_config,
)
from viaduct.recipes.gpt import gpt2_124m_pretrain_config, tiny_gpt_model, tiny_gpt_pretrain_config
from viaduct.recipes.llama import (
    llama2_7b_pretrain_config,
    llama3_8b_pretrain_config,
    llama3_70b_pretrain_config,
    llama32_1b_pretrain_config,
)
from viaduct.recipes.mamba import mamba2_130m_pretrain_config, mamba2_hybrid_8b_pretrain_config
from viaduct.recipes.qwen import qwen3_600m_pretrain_config, qwen25_500m_pretrain_config
from viaduct.recipes.registry import DEFAULT_RECIPE, get_recipe, list_recipes, recipe
from viaduct.recipes.t5 import t5_220m_pretrain_config

__all__ = [
    "DEFAULT_RECIPE",
    "get_recipe",
    "gpt2_124m_pretrain_config",
    "list_recipes",
    "llama2_7b_pretrain_config",
    "llama3_8b_peft_config",
    "llama3_8b_pretrain_config",
    "llama3_8b_sft_config",
    "llama3_70b_pretrain_config",
    "llama32_1b_peft_config",
    "llama32_1b_pretrain_config",
    "llama32_1b_sft_config",
    "mamba2_130m_pretrain_config",
    "mamba2_hybrid_8b_pretrain_config",
    "qwen3_8b_peft_config",
    "qwen3_8b_sft_config",
    "qwen3_600m_peft_config",
    "qwen3_600m_pretrain_config",
    "qwen3_600m_sft_config",
    "qwen25_500m_pretrain_config",
    "recipe",
    "t5_220m_pretrain_config",
    "tiny_gpt_model",
    "tiny_gpt_peft_config",
    "tiny_gpt_pretrain_config",
    "tiny_gpt_sft_config",
]
