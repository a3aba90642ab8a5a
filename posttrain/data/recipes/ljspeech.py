"""LJSpeech 1.1: genuine English read speech of one speaker; no official split.

Layout (the root holds ``LJSpeech-1.1/`` or is it)::

    metadata.csv     LJ001-0001|<transcription>|<normalised transcription>     ('|'-separated, no header)
    wavs/LJ001-0001.wav

``metadata.csv`` is the official utterance list; every file it names must exist. IDs follow AntiDeepfake
(prefix ``LJ``); Speaker ``LJ`` (as in the WaveFake recipe, whose fakes copy this voice); Language en.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, read_fields

UTTERANCE = re.compile(r"LJ\d{3}-\d{4}")


def ljspeech(root: Path) -> Iterator[Entry]:
    base = root / "LJSpeech-1.1" if (root / "LJSpeech-1.1").is_dir() else root
    for where, fields in read_fields(base / "metadata.csv", 2, 3, sep="|"):
        utterance = fields[0]
        if UTTERANCE.fullmatch(utterance) is None:
            raise RecipeError(f"{where}: utterance id {utterance!r} is not LJ<nnn>-<nnnn>")
        yield Entry(file_id=utterance, label="real", path=base / "wavs" / f"{utterance}.wav", speaker="LJ",
                    language="en", source=where)


RECIPES = [Recipe("ljspeech", "LJ", ljspeech, "LJSpeech 1.1, metadata.csv + wavs/*.wav")]
