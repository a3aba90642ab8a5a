"""DECRO (Ba et al., 2023): English and Chinese genuine speech and deepfakes, with ASVspoof-style protocols.

Layout (the GitHub release, ``petrichorwq-DECRO-dataset-<commit>/`` in the root, or its content)::

    {ch,en}_{train,dev,eval}.txt      speaker file - attack key
        G0019 T0055G0019S0420 - aidatatang bonafide
        unknown 20032123 - baidu spoof
    {ch,en}_{train,dev,eval}/<file>.wav

ch -> zh, en -> en; train/dev/eval -> train/valid/test. Attack: the generator for spoofs, ``-`` for
bona fide (whose column names the source corpus); Speaker ``-`` where the protocol says ``unknown``.
IDs are AntiDeepfake's ``DECRO-<proportion>-<LANG>-<file>``, the language code upper-case (ZH, EN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, label_of, present, read_fields, require_dir, split_of

LANGUAGES = {"ch": "zh", "en": "en"}
SETS = [f"{language}_{split}" for language in LANGUAGES for split in ("train", "dev", "eval")]


def _base(root: Path) -> Path:
    releases = sorted(root.glob("*DECRO-dataset*"))
    return releases[0] if len(releases) == 1 and releases[0].is_dir() else root


def decro(root: Path) -> Iterator[Entry]:
    base = _base(root)
    for name in sorted(present(base, [f"{name}.txt" for name in SETS], "DECRO protocol")):
        set_name = name.removesuffix(".txt")
        language_code, split = set_name.split("_")
        language, proportion = LANGUAGES[language_code], split_of(split, base / name)
        audio_dir = require_dir(base / set_name, f"audio folder of {name}:")
        for where, (speaker, file_name, _, attack, key) in read_fields(base / name, 5, 5):
            label = label_of(key, ("bonafide",), ("spoof",), where)
            yield Entry(file_id=f"{proportion}-{language.upper()}-{file_name}", label=label,
                        path=audio_dir / f"{file_name}.wav", proportion=proportion,
                        attack="-" if label == "real" else attack, speaker="-" if speaker == "unknown" else speaker,
                        language=language, source=where)


RECIPES = [Recipe("decro", "DECRO", decro, "DECRO, {ch,en}_{train,dev,eval}.txt + <set>/*.wav")]
