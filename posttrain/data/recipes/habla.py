"""HABLA (Tamayo Flórez et al., Interspeech 2023): Latin American Spanish genuine speech and deepfakes.

Layout (the root holds ``FinalDataset_16khz/`` or is it)::

    Real/<country>/<speaker>/<file>.wav                      e.g. Real/Chile/clf_07508/clf_07508_00799857148.wav
    <system>/<source country>-<target country>/<source>-<target>/<file>.wav
                                                             e.g. CycleGAN/Venezuela-Argentina/vem_02484-arm_01523/

``Real`` -> real, every other system folder (CycleGAN, Diff, StarGAN, ...) -> fake with that attack.
Speaker: the voice heard, i.e. the speaker folder, or its target part for ``<source>-<target>``
conversions. Language es; Proportion ``-``. IDs are AntiDeepfake's ``HABLA-<label>-<file>`` (real|fake).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files
from posttrain.data.recipes.folders import subdirs_only

GENUINE = "Real"


def habla(root: Path) -> Iterator[Entry]:
    base = root / "FinalDataset_16khz" if (root / "FinalDataset_16khz").is_dir() else root
    systems = subdirs_only(base, "system")
    if not any(system.name == GENUINE for system in systems):
        raise RecipeError(f"{base}: no {GENUINE}/ folder (expected {GENUINE}/ and one folder per spoofing system)")
    for system_dir in systems:
        genuine = system_dir.name == GENUINE
        label = "real" if genuine else "fake"
        for group_dir in subdirs_only(system_dir, "group"):
            for speaker_dir in subdirs_only(group_dir, "speaker"):
                for path in audio_files(speaker_dir, (".wav",)):
                    yield Entry(file_id=f"{label}-{path.stem}", label=label, path=path,
                                attack="-" if genuine else system_dir.name,
                                speaker=speaker_dir.name.rsplit("-", 1)[-1], language="es")


RECIPES = [Recipe("habla", "HABLA", habla, "HABLA, FinalDataset_16khz/<system>/<group>/<speaker>/*.wav")]
