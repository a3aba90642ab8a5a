"""Fake-or-Real (FoR, Reimao & Tzerpos 2019): genuine and TTS speech in four versions.

Layout (the root is ONE version folder: for-original, for-norm, for-2sec / for-2seconds, for-rerec /
for-rerecorded)::

    <version>/{training,validation,testing}/{real,fake}/*.wav   (for-original also has *.mp3)

IDs are AntiDeepfake's ``FoR-<split>-<label>-<stem>``, without the version (AD prepares one version at a
time: for-original, and for-norm for its FoR-norm column), so each version gets its own protocol CSV;
a root holding several versions is an error instead of a protocol with clashing IDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, present, split_of, subdirs

SPLITS = ("training", "validation", "testing")


def fakeorreal(root: Path) -> Iterator[Entry]:
    if not any((root / split).is_dir() for split in SPLITS):
        versions = [folder.name for folder in subdirs(root) if folder.name.startswith("for-")]
        hint = (f"it holds versions {versions}: prepare each one on its own (--root {root / versions[0]})"
                if versions else f"no {'/'.join(SPLITS)} folder")
        raise RecipeError(f"{root}: not a FoR version folder; {hint}")
    for split in sorted(present(root, SPLITS, "FoR split folder")):
        proportion = split_of(split, root / split)
        for class_dir in subdirs(root / split):
            if class_dir.name not in ("real", "fake"):
                raise RecipeError(f"{class_dir}: unexpected folder (expected real/ or fake/)")
            for path in audio_files(class_dir, (".wav", ".mp3")):
                yield Entry(file_id=f"{split}-{class_dir.name}-{path.stem}", label=class_dir.name, path=path,
                            proportion=proportion, language="en")


RECIPES = [Recipe("fakeorreal", "FoR", fakeorreal, "Fake-or-Real, one <version>/<split>/{real,fake}/*.wav|mp3")]
