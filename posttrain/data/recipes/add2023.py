"""ADD 2023 (Audio Deepfake Detection challenge, Mandarin): label file + wav folder per set.

Layout (the root is one set, e.g. Track1.2/testR2, or holds several set folders)::

    <set>/label.txt      ADD2023_T1.2R2_E_00000003.wav genuine      (genuine | fake)
    <set>/wav/<file>.wav

A set whose name contains ``train`` -> train, ``dev`` -> valid, anything else (test rounds) -> test.
AntiDeepfake evaluates Track1.2/testR2; its IDs keep the file extension (``ADD2023-ADD2023_T1.2R2_E_00000003.wav``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, label_of, read_fields, require_dir, subdirs


def _proportion(name: str) -> str:
    lowered = name.lower()
    return "train" if "train" in lowered else "valid" if "dev" in lowered else "test"


def _set(folder: Path) -> Iterator[Entry]:
    wav_dir = require_dir(folder / "wav", "wav/")
    for where, (file_name, word) in read_fields(folder / "label.txt", 2, 2):
        yield Entry(file_id=file_name, label=label_of(word, ("genuine",), ("fake",), where),
                    path=wav_dir / file_name, proportion=_proportion(folder.name), language="zh", source=where)


def add2023(root: Path) -> Iterator[Entry]:
    if (root / "label.txt").is_file():
        yield from _set(root)
        return
    sets = [folder for folder in subdirs(root) if (folder / "label.txt").is_file()]
    if not sets:
        raise RecipeError(f"{root}: no label.txt here or in any sub-folder")
    for folder in sets:
        yield from _set(folder)


RECIPES = [Recipe("add2023", "ADD2023", add2023, "ADD 2023, <set>/label.txt + <set>/wav/*.wav")]
