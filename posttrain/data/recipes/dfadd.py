"""DFADD (Du et al., SLT 2024): VCTK speech and diffusion / flow-matching TTS trained on it.

Layout (the Hugging Face archives unpacked side by side; the root holds them)::

    DATASET_VCTK_BONAFIDE/{train,valid,test}/<vctk speaker>_<utterance>[...].{wav,flac}    genuine
    DATASET_<system>/{train,valid,test}/<vctk speaker>_<utterance>_<tag>.wav                e.g. DATASET_PflowTTS

Attack: the system (folder name without ``DATASET_``; ``-`` for the genuine folder); Speaker: the VCTK
speaker that starts the file name; Language en. IDs follow AntiDeepfake (``DFADD-<folder>-<file>``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, check_name, present, split_of
from posttrain.data.recipes.folders import subdirs_only

FOLDER = re.compile(r"DATASET_(?P<system>\w+)")
GENUINE = "VCTK_BONAFIDE"
UTTERANCE = re.compile(r"(?P<speaker>[A-Za-z]+\d+)_.+\.(wav|flac)")


def dfadd(root: Path) -> Iterator[Entry]:
    folders = subdirs_only(root, "DATASET_<system>")
    if not folders:
        raise RecipeError(f"{root}: no DATASET_<system>/ folders")
    for folder in folders:
        system = check_name(FOLDER, folder).group("system")
        genuine = system == GENUINE
        for split in sorted(present(folder, ("train", "valid", "test"), "DFADD split folder")):
            for path in audio_files(folder / split, (".wav", ".flac")):
                speaker = check_name(UTTERANCE, path).group("speaker")
                yield Entry(file_id=f"{folder.name}-{path.stem}", label="real" if genuine else "fake", path=path,
                            proportion=split_of(split, folder / split), attack="-" if genuine else system,
                            speaker=speaker, language="en")


RECIPES = [Recipe("dfadd", "DFADD", dfadd, "DFADD, DATASET_<system>/{train,valid,test}/*.wav")]
