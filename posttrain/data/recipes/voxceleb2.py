"""VoxCeleb2: genuine celebrity speech from interviews (many languages, unlabelled by language).

Layout (the official archives unpacked: vox2_dev_aac -> dev/aac, vox2_test_aac -> test/aac)::

    {dev,test}/aac/<speaker id>/<video id>/<nnnnn>.m4a     (.wav if converted)

As in AntiDeepfake, only the dev set is used (its protocol script reads ``dev/aac`` alone; the test set
stays out of training) and rows have no split (Proportion ``-``). AD reads the clips converted to .wav;
m4a is accepted here too (headers read with ffprobe, slower than soundfile), with the same IDs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, check_name, present, subdirs

SPEAKER = re.compile(r"id\d+")
CLIP = re.compile(r"\d+\.(m4a|wav)")


def clips(root: Path, splits: Iterable[str]) -> Iterator[Entry]:
    """The clips of the ``splits`` folders present under ``root`` (<split>/aac/<speaker>/<video>/*)."""
    for split in sorted(present(root, splits, "split folder")):
        aac = root / split / "aac"
        if not aac.is_dir():
            raise RecipeError(f"{aac}: missing aac/ folder of the {split} set")
        for speaker_dir in subdirs(aac):
            speaker = check_name(SPEAKER, speaker_dir).group(0)
            for video_dir in subdirs(speaker_dir):
                for path in audio_files(video_dir, (".m4a", ".wav")):
                    check_name(CLIP, path)
                    yield Entry(file_id=f"{speaker}-{video_dir.name}-{path.stem}", label="real", path=path,
                                speaker=speaker)


def voxceleb2(root: Path) -> Iterator[Entry]:
    return clips(root, ("dev",))


RECIPES = [Recipe("voxceleb2", "VoxCeleb2", voxceleb2, "VoxCeleb2 dev set (as AD), dev/aac/<speaker>/<video>/*",
                  "the dev set only (a test/ folder is not read), as AntiDeepfake (docs/parity.md)")]
