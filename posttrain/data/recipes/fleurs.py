"""FLEURS (genuine read speech, 102 languages) and FLEURS-R (Miipher-restored: labelled FAKE).

Layout (both, as in the Hugging Face repositories after unpacking ``audio/<split>.tar.gz``; the root
holds ``data/`` or the locale folders directly)::

    data/<locale>/{train,dev,test}.tsv          id<TAB>file name<TAB>raw transcription<TAB>...
    data/<locale>/audio/{train,dev,test}/<file name>.wav

The TSV of a split is its official file list (several speakers may read one sentence id). FLEURS
publishes no speaker ids, so Speaker is ``-``; Language is the locale's language part (``en_us`` -> en).
IDs are AntiDeepfake's: ``FLEURS-<short code>-<file stem>`` and ``FLEURS-R-<short code>-<file stem>``, the
short code being the upper-cased language part (``EN``; ``CN`` for cmn_hans_cn, ``YUE_HANT`` for yue_hant_hk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, present, read_fields, split_of, subdirs


# AntiDeepfake's ID code of a locale folder is its language part upper-cased (en_us -> EN), except these two.
SHORT_CODE_EXCEPTIONS = {"cmn_hans_cn": "CN", "yue_hant_hk": "YUE_HANT"}


def short_code(locale: str) -> str:
    """AD's short language code of a FLEURS locale folder, as used in its IDs (FLEURS-EN-1001)."""
    return SHORT_CODE_EXCEPTIONS.get(locale, locale.split("_", 1)[0].upper())


def _locale(folder: Path, label: str, attack: str) -> Iterator[Entry]:
    language = folder.name.split("_", 1)[0]
    code = short_code(folder.name)
    for split in sorted(present(folder, ("train.tsv", "dev.tsv", "test.tsv"), "split TSV")):
        name = split.removesuffix(".tsv")
        proportion = split_of(name, folder / split)
        for where, fields in read_fields(folder / split, 3, sep="\t"):
            file_name = fields[1]
            yield Entry(file_id=f"{code}-{Path(file_name).stem}", label=label,
                        path=folder / "audio" / name / file_name, proportion=proportion, attack=attack,
                        language=language, source=where)


def _corpus(root: Path, label: str, attack: str) -> Iterator[Entry]:
    data = root / "data" if (root / "data").is_dir() else root
    for folder in subdirs(data):
        yield from _locale(folder, label, attack)


def fleurs(root: Path) -> Iterator[Entry]:
    return _corpus(root, "real", "-")


def fleurs_r(root: Path) -> Iterator[Entry]:
    return _corpus(root, "fake", "miipher")


RECIPES = [
    Recipe("fleurs", "FLEURS", fleurs, "FLEURS, data/<locale>/<split>.tsv + audio/<split>/*.wav"),
    Recipe("fleurs_r", "FLEURS-R", fleurs_r, "FLEURS-R (restored = fake), same layout as FLEURS"),
]
