"""Corpus recipes: one module per corpus layout, each turning an official layout into protocol rows.

``RECIPES`` maps a recipe name (as typed after ``posttrain data prepare``) to its ``Recipe``;
``prepare(name, root, out)`` runs one and writes the protocol CSV. Every module of this package that
defines ``RECIPES`` is found here by itself (``base`` and ``folders`` are shared plumbing): adding a
corpus is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from posttrain.data.protocol import write_protocol
from posttrain.data.recipes.base import Entry, PrepareResult, Recipe, RecipeError, build_rows


def _discover() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for recipe in getattr(module, "RECIPES", ()):
            if recipe.name in recipes:
                raise ValueError(f"recipe {recipe.name!r} is defined twice ({module.__name__})")
            recipes[recipe.name] = recipe
    return recipes


RECIPES: dict[str, Recipe] = _discover()


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown corpus recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None


def prepare(name: str, root: str | Path, out: str | Path, *, num_workers: int = 8, skip_missing: bool = False,
            progress: bool = True) -> PrepareResult:
    """Run recipe ``name`` on the corpus at ``root`` and write the protocol CSV ``out`` (atomically)."""
    result = build_rows(get_recipe(name), root, num_workers=num_workers, skip_missing=skip_missing,
                        progress=progress)
    write_protocol(result.rows, out)
    return result


__all__ = ["RECIPES", "Entry", "PrepareResult", "Recipe", "RecipeError", "build_rows", "get_recipe", "prepare"]
