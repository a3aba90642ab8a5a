"""LibriTTS (genuine) and LibriTTS-R (its speech restored by Miipher: labelled FAKE).

Layout (both; the root holds the subset folders)::

    <subset>/<speaker>/<chapter>/<speaker>_<chapter>_<paragraph>_<sentence>.wav   (+ .txt files)

Subsets: train-clean-100, train-clean-360, train-other-500 (train), dev-clean, dev-other (valid),
test-clean, test-other (test). Transcripts and alignment files beside the audio are ignored.
ID prefixes are AntiDeepfake's: ``Libri-`` and ``Libri-R-`` (so both group as ``Libri`` per corpus, as in AD).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, check_name, present

SUBSETS = {"train-clean-100": "train", "train-clean-360": "train", "train-other-500": "train",
           "dev-clean": "valid", "dev-other": "valid", "test-clean": "test", "test-other": "test"}
UTTERANCE = re.compile(r"(\d+)_(\d+)_(\d+)_(\d+)\.wav")
TEXT_SUFFIXES = (".txt", ".tsv")  # *.normalized.txt, *.original.txt, per-chapter *.trans.tsv / *.book.tsv


def _utterances(root: Path, label: str, attack: str) -> Iterator[Entry]:
    for subset in sorted(present(root, SUBSETS, "LibriTTS subset folder")):
        for path in sorted((root / subset).rglob("*")):
            if path.is_dir() or path.name.startswith(".") or path.suffix in TEXT_SUFFIXES:
                continue
            speaker, chapter = check_name(UTTERANCE, path).group(1, 2)
            if path.parent.name != chapter or path.parent.parent.name != speaker:
                raise RecipeError(f"{path}: file is not in its <speaker>/<chapter> folder {speaker}/{chapter}")
            yield Entry(file_id=path.stem, label=label, path=path, proportion=SUBSETS[subset], attack=attack,
                        speaker=speaker, language="en")


def libritts(root: Path) -> Iterator[Entry]:
    return _utterances(root, "real", "-")


def libritts_r(root: Path) -> Iterator[Entry]:
    return _utterances(root, "fake", "miipher")


RECIPES = [
    Recipe("libritts", "Libri", libritts, "LibriTTS, <subset>/<speaker>/<chapter>/*.wav"),
    Recipe("libritts_r", "Libri-R", libritts_r, "LibriTTS-R (restored = fake), same layout as LibriTTS"),
]
