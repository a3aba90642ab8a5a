"""MLAAD: multilingual TTS output of many models (all FAKE; its genuine side is M-AILABS).

Layout (the root holds ``fake/``)::

    fake/<language>/<model>/*.wav
    fake/<language>/<model>/meta.csv    '|'-separated, header with ``path`` (+ original_file, language,
                                        model_name, architecture, transcript, ...)

Attack is the model folder, Language the language folder. Where a model folder ships ``meta.csv``,
every file it lists must be present (a truncated download is named, not silently smaller).
IDs are AntiDeepfake's ``MLAAD-<language folder>-<model>-<stem>``, with ``ZH`` for the ``zh-cn`` folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, read_csv_records, require_dir, subdirs


def _check_meta(model_dir: Path, names: set[str]) -> None:
    meta = model_dir / "meta.csv"
    if not meta.is_file():
        return
    for where, record in read_csv_records(meta, ("path",), delimiter="|"):
        listed = PurePosixPath(record["path"].replace("\\", "/")).name
        if listed not in names:
            raise RecipeError(f"{where}: lists {listed!r}, which is not in {model_dir}")


def id_language(folder: str) -> str:
    """The language part of AD's MLAAD ID: the folder name as is, but ``ZH`` for (any folder containing) zh-cn."""
    return "ZH" if "zh-cn" in folder else folder


def mlaad(root: Path) -> Iterator[Entry]:
    fake = require_dir(root / "fake", "fake/")
    for language_dir in subdirs(fake):
        for model_dir in subdirs(language_dir):
            files = [path for path in sorted(model_dir.iterdir()) if path.name != "meta.csv"]
            stray = [path for path in files if path.is_dir() or path.suffix.lower() != ".wav"]
            if stray:
                raise RecipeError(f"{stray[0]}: unexpected entry in an MLAAD model folder (expected *.wav, meta.csv)")
            _check_meta(model_dir, {path.name for path in files})
            for path in files:
                yield Entry(file_id=f"{id_language(language_dir.name)}-{model_dir.name}-{path.stem}", label="fake",
                            path=path, attack=model_dir.name, language=language_dir.name)


RECIPES = [Recipe("mlaad", "MLAAD", mlaad, "MLAAD, fake/<language>/<model>/*.wav (+ meta.csv)")]
