"""Codecfake (Xie et al.): AISHELL-3 / VCTK speech and its neural-codec re-syntheses.

Layout (the root holds ``label/`` and one audio folder per label file)::

    label/train.txt, label/dev.txt, label/C1.txt .. label/C7.txt, ...
        SSB13650058.wav real 0          file label codec
        F01_SSB13650058.wav fake 1
    train/*.wav, dev/*.wav, C1/*.wav, ...

train -> train, dev -> valid, every other set (the unseen-codec test conditions) -> test.
Attack: ``F<codec>`` (two digits) for fakes; the test condition becomes part of the ID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, label_of, read_fields, require_dir

SET_PROPORTIONS = {"train": "train", "dev": "valid"}


def codecfake(root: Path) -> Iterator[Entry]:
    labels = require_dir(root / "label", "label/")
    files = sorted(labels.glob("*.txt"))
    if not files:
        raise RecipeError(f"{labels}: no label files (*.txt)")
    for label_file in files:
        name = label_file.stem
        audio_dir = require_dir(root / name, f"audio folder of {label_file.name}:")
        for where, (file_name, word, codec) in read_fields(label_file, 3, 3):
            label = label_of(word, ("real",), ("fake",), where)
            if not codec.isdigit():
                raise RecipeError(f"{where}: codec field {codec!r} is not a number")
            yield Entry(file_id=f"{name}-{Path(file_name).stem}", label=label, path=audio_dir / file_name,
                        proportion=SET_PROPORTIONS.get(name, "test"),
                        attack="-" if label == "real" else f"F{int(codec):02d}", source=where)


RECIPES = [Recipe("codecfake", "Codecfake", codecfake, "Codecfake, label/<set>.txt + <set>/*.wav")]
