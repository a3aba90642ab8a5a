"""CN-Celeb2 (OpenSLR 82): genuine Mandarin speech of Chinese celebrities in 11 genres; no official split.

Layout (``cn-celeb2_v2.tar.gz`` unpacked; the root holds ``CN-Celeb2_flac/`` or its ``data/``)::

    CN-Celeb2_flac/data/<speaker>/<genre>-<session>-<utterance>.flac   e.g. id10936/recitation-02-028.flac

IDs follow AntiDeepfake (``CNCeleb2-<speaker>-<file>``); Proportion ``-``; Language zh; Attack ``-``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, audio_files, check_name, first_existing
from posttrain.data.recipes.folders import subdirs_only

SPEAKER = re.compile(r"id\d+")
UTTERANCE = re.compile(r"[a-z_]+-\d+-\d+\.(flac|wav)")


def cnceleb2(root: Path) -> Iterator[Entry]:
    data = first_existing(root, ["CN-Celeb2_flac/data", "data"], "CN-Celeb2 data/ folder")
    for speaker_dir in subdirs_only(data, "speaker"):
        speaker = check_name(SPEAKER, speaker_dir).group(0)
        for path in audio_files(speaker_dir, (".flac", ".wav")):
            check_name(UTTERANCE, path)
            yield Entry(file_id=f"{speaker}-{path.stem}", label="real", path=path, speaker=speaker, language="zh")


RECIPES = [Recipe("cnceleb2", "CNCeleb2", cnceleb2, "CN-Celeb2, CN-Celeb2_flac/data/<speaker>/*.flac")]
