"""DSD (Diverse Synthesizer Dataset, Zenodo 13788455): genuine and TTS/VC speech in Korean, English and
Japanese, listed in one CSV.

Layout (the release's audio files and its metadata CSV in the root; nesting of the audio under the
root is not documented publicly: this follows AntiDeepfake, flat)::

    DSD_corpus_v1.csv     Utterence name (file name),TTS or VC,...,Language,...,Speaker name,...,label,Model,subset,...
        12MWKH0048_000026.wav,TTS,No,Korean,...,12MWKH0048,Male,Adult,spoof,VITS,eval,1.552
    <file name>

label bonafide -> real, spoof -> fake; subset train/dev/eval -> train/valid/test; Attack: Model (fakes);
Language: ko/en/ja. IDs follow AntiDeepfake (``DSD-<file>``). As AD's script does, the first record
after the header is left out (it reads the CSV with a DictReader and then skips one more row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import (Entry, Recipe, RecipeError, after_first_row, label_of, read_csv_records,
                                         split_of)

METADATA = "DSD_corpus_v1.csv"
FILE = "Utterence name (file name)"  # sic: the release's spelling
LANGUAGES = {"korean": "ko", "english": "en", "japanese": "ja"}


def dsd(root: Path) -> Iterator[Entry]:
    columns = (FILE, "Language", "Speaker name", "label", "Model", "subset")
    for where, record in after_first_row(read_csv_records(root / METADATA, columns)):
        label = label_of(record["label"], ("bonafide",), ("spoof",), where)
        language = LANGUAGES.get(record["Language"].lower())
        if language is None:
            raise RecipeError(f"{where}: unknown language {record['Language']!r} (expected one of "
                              f"{sorted(name.title() for name in LANGUAGES)})")
        name = record[FILE]
        yield Entry(file_id=Path(name).stem, label=label, path=root / name,
                    proportion=split_of(record["subset"], where), attack="-" if label == "real" else record["Model"],
                    speaker=record["Speaker name"], language=language, source=where)


RECIPES = [Recipe("dsd", "DSD", dsd, f"DSD, {METADATA} + <file>.wav",
                  "the first record after the header is left out, as AntiDeepfake's script does (docs/parity.md)")]
