"""Multilingual LibriSpeech (MLS): genuine read speech in 8 languages.

Layout (the root holds ``mls_<language>/`` folders, or is one of them)::

    mls_german/{train,dev,test}/transcripts.txt     <speaker>_<book>_<utt><TAB><text>
    mls_german/{train,dev,test}/audio/<speaker>/<book>/<speaker>_<book>_<utt>.flac   (.opus in mls_*_opus)

The transcript is the official utterance list of a split; every utterance it names must exist.
IDs are AntiDeepfake's MLS.py ones, ``MLS-<LANG>-<utterance>`` (``MLS-DE-1844_931_000001``). AD's script maps
six languages only (no Polish, no Portuguese: its 50,558 h are the six languages' train+dev+test); the two
others get the same scheme here (PL, PT).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, present, read_fields, split_of, subdirs

LANGUAGES = {"english": "en", "german": "de", "dutch": "nl", "french": "fr", "spanish": "es",
             "italian": "it", "portuguese": "pt", "polish": "pl"}
FOLDER = re.compile(r"mls_([a-z]+?)(?:_opus)?")
UTTERANCE = re.compile(r"(\d+)_(\d+)_(\d+)")


def _language(folder: Path) -> str:
    match = FOLDER.fullmatch(folder.name)
    if match is None or match.group(1) not in LANGUAGES:
        raise RecipeError(f"{folder}: unexpected folder (expected mls_<language>[_opus] with a language in "
                          f"{sorted(LANGUAGES)})")
    return LANGUAGES[match.group(1)]


def _split(folder: Path, language: str) -> Iterator[Entry]:
    proportion = split_of(folder.name, folder)
    extension = ".opus" if folder.parent.name.endswith("_opus") else ".flac"
    for where, (utterance, _text) in read_fields(folder / "transcripts.txt", 2, 2, sep="\t"):
        match = UTTERANCE.fullmatch(utterance)
        if match is None:
            raise RecipeError(f"{where}: utterance id {utterance!r} is not <speaker>_<book>_<utt>")
        speaker, book, _ = match.groups()
        # AD writes the language code upper-case in the ID (MLS-DE-<utt>), lower-case elsewhere here.
        yield Entry(file_id=f"{language.upper()}-{utterance}", label="real",
                    path=folder / "audio" / speaker / book / f"{utterance}{extension}",
                    proportion=proportion, speaker=f"{language}-{speaker}", language=language, source=where)


def mls(root: Path) -> Iterator[Entry]:
    language_dirs = [root] if FOLDER.fullmatch(root.name) else subdirs(root)
    for language_dir in language_dirs:
        language = _language(language_dir)
        for split in sorted(present(language_dir, ("train", "dev", "test"), "split folder")):
            yield from _split(language_dir / split, language)


RECIPES = [Recipe("mls", "MLS", mls, "Multilingual LibriSpeech, mls_<language>/<split>/transcripts.txt + audio/")]
