"""AISHELL-3 (OpenSLR 93): genuine Mandarin read speech, 218 speakers.

Layout (as unpacked; the root holds ``train/`` and ``test/``, or ``data_aishell3/`` holding them)::

    {train,test}/wav/<speaker>/<speaker><nnnn>.wav      e.g. train/wav/SSB0005/SSB00050001.wav
    {train,test}/content.txt, label_train-set.txt, prosody/ ...   (transcripts: not read)

IDs follow AntiDeepfake (``AIShell3-<speaker>-<utterance>``); Language zh.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import (Entry, Recipe, RecipeError, audio_files, check_name, present, require_dir,
                                         split_of)
from posttrain.data.recipes.folders import subdirs_only

SPEAKER = re.compile(r"SSB\d{4}")


def aishell3(root: Path) -> Iterator[Entry]:
    base = root / "data_aishell3" if (root / "data_aishell3").is_dir() else root
    for split in sorted(present(base, ("train", "test"), "AISHELL-3 split folder")):
        wav_dir = require_dir(base / split / "wav", f"{split}/wav/")
        for speaker_dir in subdirs_only(wav_dir, "speaker"):
            speaker = check_name(SPEAKER, speaker_dir).group(0)
            for path in audio_files(speaker_dir, (".wav",)):
                if not path.stem.startswith(speaker):
                    raise RecipeError(f"{path}: file is not in its speaker folder (expected {speaker}<nnnn>.wav)")
                yield Entry(file_id=f"{speaker}-{path.stem}", label="real", path=path,
                            proportion=split_of(split, base / split), speaker=speaker, language="zh")


RECIPES = [Recipe("aishell3", "AIShell3", aishell3, "AISHELL-3, {train,test}/wav/<speaker>/*.wav")]
