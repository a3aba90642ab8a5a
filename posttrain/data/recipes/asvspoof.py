"""ASVspoof 2019 LA, 2021 LA/DF and ASVspoof 5: whitespace-separated CM protocols with keys.

2019 LA (``LA/`` as unpacked, or its content at the root)::

    ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt
        LA_0079 LA_T_1138215 - - bonafide        speaker file - attack key
    ASVspoof2019_LA_{train,dev,eval}/flac/<file>.flac

2021 LA / DF (evaluation only; keys from LA-keys-full / DF-keys-full)::

    keys/LA/CM/trial_metadata.txt   LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval
    keys/DF/CM/trial_metadata.txt   LA_0023 DF_E_2000011 nocodec asvspoof A14 spoof notrim progress ...
    ASVspoof2021_{LA,DF}_eval/flac/<file>.flac

ASVspoof 5 (``.tsv`` files that are space-separated)::

    ASVspoof5.train.tsv, ASVspoof5.dev.track_1.tsv, ASVspoof5.eval.track_1.tsv (at the root or in
    ASVspoof5_protocols/):  T_4850 T_0000000000 F - - - AC3 A05 spoof -
        speaker file gender codec codec_q codec_seed attack_tag attack key tmp
    flac_T/, flac_D/, flac_E_eval/ (at the root or one folder down, e.g. ASVspoof5_train/flac_T)

Labels: ``bonafide`` -> real, ``spoof`` -> fake; bona fide rows get attack ``-``. Language: en.
A protocol file that is absent is skipped (partial downloads are common); none at all is an error.
ASVspoof 5 IDs are AntiDeepfake's ``ASV5-<attack>-<file>`` (``ASV5-bonafide-T_...`` for genuine rows), and
the first row of each TSV is left out as AD's script does (it reads the header-less TSVs with a header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import (Entry, Recipe, RecipeError, after_first_row, first_existing, label_of, present,
                                         read_fields)

KEYS = {"real": ("bonafide",), "fake": ("spoof",)}


def _entry(where: str, speaker: str, name: str, attack: str, key: str, audio_dir: Path, proportion: str,
           file_id: str | None = None) -> Entry:
    label = label_of(key, KEYS["real"], KEYS["fake"], where)
    return Entry(file_id=file_id or name, label=label, path=audio_dir / f"{name}.flac", proportion=proportion,
                 attack="-" if label == "real" else attack, speaker=speaker, language="en", source=where)


def asvspoof2019_la(root: Path) -> Iterator[Entry]:
    base = root / "LA" if (root / "LA" / "ASVspoof2019_LA_cm_protocols").is_dir() else root
    protocols = base / "ASVspoof2019_LA_cm_protocols"
    splits = {"train": ("train.trn", "train"), "dev": ("dev.trl", "valid"), "eval": ("eval.trl", "test")}
    found = present(protocols, [f"ASVspoof2019.LA.cm.{suffix}.txt" for suffix, _ in splits.values()],
                    "cm protocol")
    for split, (suffix, proportion) in splits.items():
        protocol = protocols / f"ASVspoof2019.LA.cm.{suffix}.txt"
        if protocol.name not in found:
            continue
        audio_dir = base / f"ASVspoof2019_LA_{split}" / "flac"
        for where, (speaker, name, _, attack, key) in read_fields(protocol, 5, 5):
            yield _entry(where, speaker, name, attack, key, audio_dir, proportion)


def _asvspoof2021(root: Path, track: str) -> Iterator[Entry]:
    keys = first_existing(root, [f"keys/{track}/CM/trial_metadata.txt",
                                 f"{track}-keys-full/keys/{track}/CM/trial_metadata.txt",
                                 "trial_metadata.txt"], f"{track} CM trial_metadata.txt")
    audio_dir = first_existing(root, [f"ASVspoof2021_{track}_eval/flac", "flac"], f"{track} eval flac folder")
    # Only speaker, trial, attack and key are used; the remaining columns (codec, channel/source, trim,
    # phase, vocoder family) differ between LA (8 fields) and DF (13 fields).
    for where, fields in read_fields(keys, 8, 13):
        yield _entry(where, fields[0], fields[1], fields[4], fields[5], audio_dir, "test")


def asvspoof2021_la(root: Path) -> Iterator[Entry]:
    return _asvspoof2021(root, "LA")


def asvspoof2021_df(root: Path) -> Iterator[Entry]:
    return _asvspoof2021(root, "DF")


ASV5_SPLITS = (("ASVspoof5.train.tsv", "flac_T", "train"),
               ("ASVspoof5.dev.track_1.tsv", "flac_D", "valid"),
               ("ASVspoof5.eval.track_1.tsv", "flac_E_eval", "test"))


def _find_dir(root: Path, name: str) -> Path:
    candidates = [root / name, *sorted(root.glob(f"*/{name}"))]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RecipeError(f"{root}: audio folder {name}/ not found (looked in the root and one level down)")


def asvspoof5(root: Path) -> Iterator[Entry]:
    protocol_dir = root / "ASVspoof5_protocols" if (root / "ASVspoof5_protocols").is_dir() else root
    found = present(protocol_dir, [name for name, _, _ in ASV5_SPLITS], "track 1 protocol")
    for name, folder, proportion in ASV5_SPLITS:
        protocol = protocol_dir / name
        if name not in found:
            continue
        audio_dir = _find_dir(root, folder)
        for where, fields in after_first_row(read_fields(protocol, 10, 10)):
            # AD's ID carries the raw attack field ("bonafide" for genuine rows): ASV5-<attack>-<file>.
            yield _entry(where, fields[0], fields[1], fields[7], fields[8], audio_dir, proportion,
                         file_id=f"{fields[7]}-{fields[1]}")


RECIPES = [
    Recipe("asvspoof2019_la", "ASV19LA", asvspoof2019_la, "ASVspoof 2019 LA, cm protocols + flac"),
    Recipe("asvspoof2021_la", "ASV21LA", asvspoof2021_la, "ASVspoof 2021 LA eval, keys/LA/CM/trial_metadata.txt"),
    Recipe("asvspoof2021_df", "ASV21DF", asvspoof2021_df, "ASVspoof 2021 DF eval, keys/DF/CM/trial_metadata.txt"),
    Recipe("asvspoof5", "ASV5", asvspoof5, "ASVspoof 5 track 1, ASVspoof5.*.tsv + flac_T/D/E_eval",
           "the first row of each TSV is left out, as AntiDeepfake's script does (docs/parity.md)"),
]
