"""CFAD (Ma et al., 2024): Chinese Fake Audio Detection, in clean, noisy and codec versions.

Layout (the Zenodo release unpacked; the root holds ``CFAD/`` or is it)::

    <version>/<split>_<condition>/{real,fake}_<condition>/<source or attack>/<file>.wav
        e.g. clean_version/train_clean/real_clean/aishell1/...wav
             codec_version/test_seen_codec/fake_codec/lpcnet/SSB09660003_lpcnet_m4a.wav

versions: clean_version, noisy_version, codec_version; splits: train -> train, dev -> valid,
test_seen / test_unseen -> test. Attack: the generator folder for fakes; ``-`` for genuine files (their
folder names the source corpus: aishell1, aishell3, thchs30, magicdata, ...). Speaker ``-`` (each source
corpus names its files differently); Language zh. IDs are AntiDeepfake's
``CFAD-<version>-<proportion>-<label>-<file stem>``; where that clashes (the same file name in two
folders that map to one proportion and label), preparing stops and names both files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, check_name
from posttrain.data.recipes.folders import subdirs_only

VERSION = re.compile(r"(clean|noisy|codec)_version")
SPLIT = re.compile(r"(?P<split>train|dev|test_seen|test_unseen)_[a-z]+")
CLASS = re.compile(r"(?P<label>real|fake)_[a-z]+")
PROPORTIONS = {"train": "train", "dev": "valid", "test_seen": "test", "test_unseen": "test"}


def cfad(root: Path) -> Iterator[Entry]:
    base = root / "CFAD" if (root / "CFAD").is_dir() else root
    versions = subdirs_only(base, "version")
    if not versions:
        raise RecipeError(f"{base}: no CFAD version folders (expected clean_version/, noisy_version/, codec_version/)")
    for version_dir in versions:
        check_name(VERSION, version_dir)
        for split_dir in subdirs_only(version_dir, "split"):
            proportion = PROPORTIONS[check_name(SPLIT, split_dir).group("split")]
            for class_dir in subdirs_only(split_dir, "real_*/fake_*"):
                label = check_name(CLASS, class_dir).group("label")
                for source_dir in subdirs_only(class_dir, "source/attack"):
                    for path in audio_files(source_dir, (".wav",)):
                        yield Entry(file_id=f"{version_dir.name}-{proportion}-{label}-{path.stem}",
                                    label=label, path=path, proportion=proportion,
                                    attack=source_dir.name if label == "fake" else "-", language="zh")


RECIPES = [Recipe("cfad", "CFAD", cfad, "CFAD, <version>/<split>_<cond>/{real,fake}_<cond>/<source>/*.wav")]
