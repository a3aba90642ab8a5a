"""Diffusion-based deepfake corpora without genuine audio (all FAKE): Diffuse or Confuse, DiffSSD.

Diffuse or Confuse (Firc et al., 2024; "DiffusionDeepfake"), LJSpeech sentences from diffusion TTS
and vocoders; the root holds one folder per system::

    <system>/<utterance>.wav            e.g. tacotron2-DCA_wavegrad/LJ044-0144.wav

DiffSSD (Bhagtani et al., 2024); its release holds the generated speech only (the genuine side is
LibriSpeech / LJSpeech, fetched separately); the root holds ``generated_speech/`` or is it::

    generated_speech/<generator>/<file>.wav                       single-voice (LJSpeech) generators
    generated_speech/<generator>/speaker_<n>/<file>.wav           zero-shot generators, one folder per voice

Attack: the system / generator folder. Speaker: ``LJ`` for LJSpeech utterance names
(Diffuse or Confuse), the ``speaker_<n>`` folder (DiffSSD), else ``-``. Language en; Proportion ``-``.
IDs are AntiDeepfake's: ``DiffFake-<system>-<file>`` and ``DiffSSD-<generator>-<speaker_n or ->-EN-<file>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, check_name, require_dir, subdirs
from posttrain.data.recipes.folders import subdirs_only

LJ_UTTERANCE = re.compile(r"LJ\d{3}-\d{4}")
SPEAKER = re.compile(r"speaker_\d+")


def diffuse_or_confuse(root: Path) -> Iterator[Entry]:
    for system_dir in subdirs_only(root, "system"):
        for path in audio_files(system_dir, (".wav",)):
            speaker = "LJ" if LJ_UTTERANCE.fullmatch(path.stem) else "-"
            yield Entry(file_id=f"{system_dir.name}-{path.stem}", label="fake", path=path, attack=system_dir.name,
                        speaker=speaker, language="en")


def diffssd(root: Path) -> Iterator[Entry]:
    base = root if root.name == "generated_speech" else require_dir(root / "generated_speech", "generated_speech/")
    others = [folder for folder in subdirs(base.parent) if folder != base] if base != root else []
    if others:  # e.g. a genuine-speech folder this recipe would silently leave out (or mislabel)
        raise RecipeError(f"{others[0]}: unexpected folder beside generated_speech/ (DiffSSD's release is all fake)")
    for generator_dir in subdirs_only(base, "generator"):
        generator = generator_dir.name
        for path in audio_files(generator_dir, (".wav",)):
            # AD's DiffSSD ID: <generator>-<speaker folder, or "-" without one>-EN-<file stem>.
            yield Entry(file_id=f"{generator}-{'-'}-EN-{path.stem}", label="fake", path=path, attack=generator,
                        language="en")
        for speaker_dir in subdirs(generator_dir):
            speaker = check_name(SPEAKER, speaker_dir).group(0)
            for path in audio_files(speaker_dir, (".wav",)):
                yield Entry(file_id=f"{generator}-{speaker}-EN-{path.stem}", label="fake", path=path, attack=generator,
                            speaker=speaker, language="en")


RECIPES = [
    Recipe("diffuse_or_confuse", "DiffFake", diffuse_or_confuse, "Diffuse or Confuse (fake), <system>/*.wav"),
    Recipe("diffssd", "DiffSSD", diffssd, "DiffSSD (fake), generated_speech/<generator>/[speaker_<n>/]*.wav"),
]
