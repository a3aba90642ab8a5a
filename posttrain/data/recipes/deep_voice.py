"""DEEP-VOICE (Bird & Lotfi, 2023): public-figure speech and RVC voice conversions of it.

Layout (the Kaggle release; the root holds ``AUDIO/`` or is it)::

    AUDIO/REAL/<speaker>-original.wav
    AUDIO/FAKE/<source>-to-<target>.wav      <source>'s speech in <target>'s voice

Speaker is the voice heard (the target of a conversion); Attack ``rvc``; Proportion test (no split).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, audio_files, check_name, require_dir

NAMES = {"real": re.compile(r"(?P<speaker>[A-Za-z0-9_]+)-original\.wav"),
         "fake": re.compile(r"[A-Za-z0-9_]+-to-(?P<speaker>[A-Za-z0-9_]+)\.wav")}


def deep_voice(root: Path) -> Iterator[Entry]:
    base = root / "AUDIO" if (root / "AUDIO").is_dir() else root
    for label, pattern in NAMES.items():
        for path in audio_files(require_dir(base / label.upper(), f"{label.upper()}/"), (".wav",)):
            speaker = check_name(pattern, path).group("speaker")
            yield Entry(file_id=f"{label}-{path.stem}", label=label, path=path, proportion="test",
                        attack="-" if label == "real" else "rvc", speaker=speaker, language="en")


RECIPES = [Recipe("deep_voice", "DeepVoice", deep_voice, "DEEP-VOICE, AUDIO/{REAL,FAKE}/*.wav")]
