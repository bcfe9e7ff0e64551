"""Recipes: plain functions that return a complete `ConfigContainer`.

from viaduct.recipes import llama32_1b_pretrain_config, get_recipe
cfg = get_recipe("llama32_1b")()
"""

from viaduct.recipes.gpt import tiny_gpt_model, tiny_gpt_pretrain_config
from viaduct.recipes.llama import llama3_8b_pretrain_config, llama32_1b_pretrain_config
from viaduct.recipes.registry import DEFAULT_RECIPE, get_recipe, list_recipes, recipe

__all__ = [
    "DEFAULT_RECIPE",
    "get_recipe",
    "list_recipes",
    "llama3_8b_pretrain_config",
    "llama32_1b_pretrain_config",
    "recipe",
    "tiny_gpt_model",
    "tiny_gpt_pretrain_config",
]
