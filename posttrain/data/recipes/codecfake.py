"""Codecfake (Xie et al.): AISHELL-3 / VCTK speech and its neural-codec re-syntheses.

Layout (the root holds ``label/`` and one audio folder per label file)::

    label/train.txt, label/dev.txt, label/C1.txt .. label/C7.txt, ...
        SSB13650058.wav real 0          file label codec
        F01_SSB13650058.wav fake 1
    train/*.wav, dev/*.wav, C1/*.wav, ...

As in AntiDeepfake, only three sets are used: train -> train, dev -> valid, C7 -> test (AD trains on train
and C7). The unseen-codec test conditions C1-C6 and any other set are left out, so they can never leak
into training. IDs are AD's ``Codecf-<file stem>`` (no set name), and the first row of each label file is
left out as AD's script does (it reads the header-less files with a header).
Attack: ``F<codec>`` (two digits) for fakes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import (Entry, Recipe, RecipeError, after_first_row, label_of, present, read_fields,
                                         require_dir)

SET_PROPORTIONS = {"train": "train", "dev": "valid", "C7": "test"}


def codecfake(root: Path) -> Iterator[Entry]:
    labels = require_dir(root / "label", "label/")
    found = present(labels, [f"{name}.txt" for name in SET_PROPORTIONS], "label file")
    for name, proportion in SET_PROPORTIONS.items():
        label_file = labels / f"{name}.txt"
        if label_file.name not in found:
            continue
        audio_dir = require_dir(root / name, f"audio folder of {label_file.name}:")
        for where, (file_name, word, codec) in after_first_row(read_fields(label_file, 3, 3)):
            label = label_of(word, ("real",), ("fake",), where)
            if not codec.isdigit():
                raise RecipeError(f"{where}: codec field {codec!r} is not a number")
            yield Entry(file_id=Path(file_name).stem, label=label, path=audio_dir / file_name, proportion=proportion,
                        attack="-" if label == "real" else f"F{int(codec):02d}", source=where)


RECIPES = [Recipe("codecfake", "Codecf", codecfake, "Codecfake, label/{train,dev,C7}.txt + {train,dev,C7}/*.wav",
                  "only train, dev and C7, each without its first row, as AntiDeepfake (docs/parity.md)")]
