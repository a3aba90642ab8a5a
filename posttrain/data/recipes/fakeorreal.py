"""Fake-or-Real (FoR, Reimao & Tzerpos 2019): genuine and TTS speech in four versions.

Layout (the root is one version folder, or holds several: for-original, for-norm, for-2sec /
for-2seconds, for-rerec / for-rerecorded)::

    <version>/{training,validation,testing}/{real,fake}/*.wav   (for-original also has *.mp3)

The version is part of the ID (the same file name recurs across versions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, present, split_of, subdirs

SPLITS = ("training", "validation", "testing")


def _version(folder: Path) -> Iterator[Entry]:
    for split in sorted(present(folder, SPLITS, "FoR split folder")):
        proportion = split_of(split, folder / split)
        for class_dir in subdirs(folder / split):
            if class_dir.name not in ("real", "fake"):
                raise RecipeError(f"{class_dir}: unexpected folder (expected real/ or fake/)")
            for path in audio_files(class_dir, (".wav", ".mp3")):
                yield Entry(file_id=f"{folder.name}-{split}-{class_dir.name}-{path.stem}", label=class_dir.name,
                            path=path, proportion=proportion, language="en")


def fakeorreal(root: Path) -> Iterator[Entry]:
    if any((root / split).is_dir() for split in SPLITS):
        yield from _version(root)
        return
    versions = [folder for folder in subdirs(root) if folder.name.startswith("for-")]
    if not versions:
        raise RecipeError(f"{root}: neither a FoR version folder ({'/'.join(SPLITS)}) nor a folder of for-* versions")
    for version in versions:
        yield from _version(version)


RECIPES = [Recipe("fakeorreal", "FoR", fakeorreal, "Fake-or-Real, <version>/<split>/{real,fake}/*.wav")]
