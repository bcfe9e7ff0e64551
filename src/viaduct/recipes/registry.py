"""Recipes by name: `--recipe NAME` on the command line, `get_recipe(NAME)` in Python."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from viaduct.config.errors import ConfigError, Problem, did_you_mean

if TYPE_CHECKING:
    from viaduct.training.config import ConfigContainer

RecipeFn = Callable[..., "ConfigContainer"]
"""A recipe: keyword arguments (`viaduct.recipes.common.PretrainKwargs`) -> a complete config."""
_RECIPES: dict[str, RecipeFn] = {}
_ALIASES: dict[str, str] = {}
DEFAULT_RECIPE = "default"


def recipe(*aliases: str) -> Callable[[RecipeFn], RecipeFn]:
    """Register a recipe function under its own name and any short `aliases`."""

    def register(fn: RecipeFn) -> RecipeFn:
        _RECIPES[fn.__name__] = fn
        for alias in aliases:
            _ALIASES[alias] = fn.__name__
        return fn

    return register


def list_recipes() -> dict[str, str]:
    """Recipe name -> first line of its docstring (aliases included, marked)."""
    out = {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in sorted(_RECIPES.items())}
    out.update({alias: f"alias of {target}" for alias, target in sorted(_ALIASES.items())})
    return out


def get_recipe(name: str) -> RecipeFn:
    """The recipe function called `name` (or one of its aliases)."""
    key = name.strip()
    key = _ALIASES.get(key, key)
    if key.endswith("_config") is False and key + "_config" in _RECIPES:
        key += "_config"
    fn = _RECIPES.get(key)
    if fn is None:
        known = sorted(_RECIPES) + sorted(_ALIASES)
        hint = did_you_mean(name, known)
        raise ConfigError(
            Problem(
                "recipe",
                "no such recipe",
                name,
                fix=(hint + " " if hint else "") + f"known recipes: {', '.join(known)}",
            )
        )
    return fn
