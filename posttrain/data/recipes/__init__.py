"""Corpus recipes: one module per corpus layout, each turning an official layout into protocol rows.

``RECIPES`` maps a recipe name (as typed after ``posttrain data prepare``) to its ``Recipe``;
``prepare(name, root, out)`` runs one and writes the protocol CSV.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.protocol import write_protocol
from posttrain.data.recipes import (add2023, asvspoof, codecfake, deep_voice, fakeorreal, fleurs, in_the_wild,
                                    libritts, mlaad, mls, spoofceleb, voxceleb2, wavefake)
from posttrain.data.recipes import (aishell3, cfad, cnceleb2, codecfake_vctk, cvoicefake, decro, dfadd, diffusion, dsd,
                                    habla, ljspeech, vocoded, voicemos)
from posttrain.data.recipes.base import Entry, PrepareResult, Recipe, RecipeError, build_rows

_MODULES = (asvspoof, mls, libritts, fleurs, voxceleb2, wavefake, mlaad, spoofceleb, codecfake, in_the_wild,
            fakeorreal, add2023, deep_voice, aishell3, cnceleb2, ljspeech, vocoded, cvoicefake, codecfake_vctk,
            diffusion, cfad, dfadd, dsd, decro, habla, voicemos)
RECIPES: dict[str, Recipe] = {recipe.name: recipe for module in _MODULES for recipe in module.RECIPES}


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
