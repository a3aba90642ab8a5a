"""Walking the intermediate folders of deep layouts without silently dropping audio.

``base.subdirs`` lists sub-folders only; in a layout such as ``<system>/<group>/<speaker>/*.wav`` an
audio file misplaced one level up would be left out without a word. ``subdirs_only`` names it instead.
(Other files beside the sub-folders, such as READMEs and score tables, are left alone.)
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.recipes.base import AUDIO_EXTENSIONS, RecipeError, subdirs


def subdirs_only(folder: Path, what: str) -> list[Path]:
    """The sub-folders of ``folder`` (sorted); an audio file directly in it is a layout error."""
    misplaced = sorted(path for path in folder.iterdir()
                       if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS)
    if misplaced:
        raise RecipeError(f"{misplaced[0]}: audio file outside a {what} folder")
    return subdirs(folder)
