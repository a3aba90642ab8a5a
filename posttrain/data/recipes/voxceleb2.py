"""VoxCeleb2: genuine celebrity speech from interviews (many languages, unlabelled by language).

Layout (the official archives unpacked: vox2_dev_aac -> dev/aac, vox2_test_aac -> test/aac)::

    {dev,test}/aac/<speaker id>/<video id>/<nnnnn>.m4a     (.wav if converted)

dev -> train, test -> test. m4a headers are read with ffprobe (slower than soundfile).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, check_name, present, subdirs

SPEAKER = re.compile(r"id\d+")
CLIP = re.compile(r"\d+\.(m4a|wav)")


def voxceleb2(root: Path) -> Iterator[Entry]:
    for split in sorted(present(root, ("dev", "test"), "split folder")):
        proportion = "train" if split == "dev" else "test"
        aac = root / split / "aac"
        if not aac.is_dir():
            raise RecipeError(f"{aac}: missing aac/ folder of the {split} set")
        for speaker_dir in subdirs(aac):
            speaker = check_name(SPEAKER, speaker_dir).group(0)
            for video_dir in subdirs(speaker_dir):
                for path in audio_files(video_dir, (".m4a", ".wav")):
                    check_name(CLIP, path)
                    yield Entry(file_id=f"{speaker}-{video_dir.name}-{path.stem}", label="real", path=path,
                                proportion=proportion, speaker=speaker)


RECIPES = [Recipe("voxceleb2", "VoxCeleb2", voxceleb2, "VoxCeleb2, {dev,test}/aac/<speaker>/<video>/*.m4a")]
