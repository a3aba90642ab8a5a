"""Vocoded copies of genuine corpora (VoxCeleb2-Vocoded, LibriTTS-Vocoded): all FAKE.

Made with the recipe of Wang & Yamagishi (ICASSP 2023; AntiDeepfake links its Colab): each vocoder
re-synthesises the genuine corpus into its own folder, which mirrors the original layout::

    VoxCeleb2-Vocoded/<vocoder>/{dev,test}/aac/<speaker>/<video>/<nnnnn>.wav
    LibriTTS-Vocoded/<vocoder>/<subset>/<speaker>/<chapter>/<speaker>_<chapter>_<par>_<sent>.wav

(vocoders e.g. hifigan, hn_sinc_nsf, hn_sinc_nsf_hifi, waveglow). Each vocoder folder is parsed by the
genuine corpus' own layout; the vocoder becomes the attack and the first part of the file ID. IDs and
prefixes are AntiDeepfake's: ``VoxCeleb2-Vo-<vocoder>-...`` and ``LibriTTS-Vo-<vocoder>-...`` (so they group
per corpus as ``VoxCeleb2`` and ``LibriTTS``, as in AD). Splits, speakers and languages come from the
genuine layout; VoxCeleb2-Vocoded takes every split folder a vocoder has (AD reads all its .wav files),
with no split (Proportion ``-``) and no language.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator

from posttrain.data.recipes import libritts, voxceleb2
from posttrain.data.recipes.base import Entry, Recipe
from posttrain.data.recipes.folders import subdirs_only


def _vocoded(root: Path, genuine: Callable[[Path], Iterable[Entry]]) -> Iterator[Entry]:
    for vocoder_dir in subdirs_only(root, "vocoder"):
        vocoder = vocoder_dir.name
        for entry in genuine(vocoder_dir):
            yield dataclasses.replace(entry, file_id=f"{vocoder}-{entry.file_id}", label="fake", attack=vocoder)


def voxceleb2_vocoded(root: Path) -> Iterator[Entry]:
    return _vocoded(root, lambda vocoder_dir: voxceleb2.clips(vocoder_dir, ("dev", "test")))


def libritts_vocoded(root: Path) -> Iterator[Entry]:
    return _vocoded(root, libritts.libritts)


RECIPES = [
    Recipe("voxceleb2_vocoded", "VoxCeleb2-Vo", voxceleb2_vocoded,
           "VoxCeleb2-Vocoded (fake), <vocoder>/{dev,test}/aac/<speaker>/<video>/*.wav"),
    Recipe("libritts_vocoded", "LibriTTS-Vo", libritts_vocoded,
           "LibriTTS-Vocoded (fake), <vocoder>/<subset>/<speaker>/<chapter>/*.wav"),
]
