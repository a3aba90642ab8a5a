"""SpoofCeleb: VoxCeleb1 speech (attack ``a00``, genuine) and TTS built from it (``a01``.., FAKE).

Layout (the root holds ``flac/`` and ``metadata/``)::

    metadata/{train,development,evaluation}.csv      file,speaker,attack
        a00/id10318/YYsxcZ5saac-00002-006.flac,id10318,a00
    flac/{train,development,evaluation}/<file>

IDs are AntiDeepfake's: the raw relative file path without its extension, no split
(``SpoofCeleb-a00/id10318/YYsxcZ5saac-00002-006``; shard keys map the slashes to ``_``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, present, read_csv_records, split_of

GENUINE_ATTACK = "a00"


def spoofceleb(root: Path) -> Iterator[Entry]:
    metadata = root / "metadata"
    if not metadata.is_dir():
        raise RecipeError(f"{metadata}: missing metadata/ folder")
    for name in sorted(present(metadata, ("train.csv", "development.csv", "evaluation.csv"), "split CSV")):
        split = name.removesuffix(".csv")
        proportion = split_of(split, metadata / name)
        for where, record in read_csv_records(metadata / name, ("file", "speaker", "attack")):
            relative, attack = record["file"], record["attack"]
            if not relative.startswith(f"{attack}/"):
                raise RecipeError(f"{where}: file {relative!r} is not in its attack folder {attack}/")
            genuine = attack == GENUINE_ATTACK
            yield Entry(file_id=relative.removesuffix(Path(relative).suffix),
                        label="real" if genuine else "fake", path=root / "flac" / split / relative,
                        proportion=proportion, attack="-" if genuine else attack, speaker=record["speaker"],
                        source=where)


RECIPES = [Recipe("spoofceleb", "SpoofCeleb", spoofceleb, "SpoofCeleb, metadata/<split>.csv + flac/<split>/")]
