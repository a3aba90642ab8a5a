"""CodecFake (Wu, Tseng & Lee, Interspeech 2024): VCTK utterances re-synthesised by neural codecs (all FAKE).

Distinct from Xie et al.'s Codecfake (the ``codecfake`` recipe). Layout (the root holds ``processed/``
or is it)::

    processed/<codec>+<vctk speaker>_<utterance>.wav      e.g. encodec_24khz+p272_103.wav

Attack: the codec; Speaker: the VCTK speaker; Language en; Proportion ``-`` (no official split).
IDs follow AntiDeepfake (``CodecF-<file name>``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, audio_files, check_name

NAME = re.compile(r"(?P<codec>[^+]+)\+(?P<speaker>[A-Za-z]+\d+)_[^+]+\.wav")


def codecfake_vctk(root: Path) -> Iterator[Entry]:
    base = root / "processed" if (root / "processed").is_dir() else root
    for path in audio_files(base, (".wav",)):
        match = check_name(NAME, path)
        yield Entry(file_id=path.stem, label="fake", path=path, attack=match.group("codec"),
                    speaker=match.group("speaker"), language="en")


RECIPES = [Recipe("codecfake_vctk", "CodecF", codecfake_vctk, "CodecFake (Wu et al.), processed/<codec>+<utt>.wav")]
