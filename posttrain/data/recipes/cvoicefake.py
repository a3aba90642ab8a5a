"""CVoiceFake (Li et al., SafeEar, CCS 2024): Common Voice clips and vocoder re-syntheses of them.

Layout (``CVoiceFake_Large``, the root or the folder it holds; ``CVoiceFake_Small`` is laid out alike)::

    <LANG>/Bonafide/common_voice_<lang>_<n>.mp3                     genuine (real)
    <LANG>/<vocoder>_generated/common_voice_<lang>_<n>_Gen.mp3      e.g. vctk_parallel_wavegan.v1_generated

LANG in DE, EN, FR, IT, CN (-> zh). IDs follow AntiDeepfake (``CVoice-<LANG>-<folder>-<file>``);
Attack: the vocoder (folder name without ``_generated``); Speaker ``-`` (file names carry no speaker);
Proportion ``-``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files
from posttrain.data.recipes.folders import subdirs_only

LANGUAGES = {"DE": "de", "EN": "en", "FR": "fr", "IT": "it", "CN": "zh"}
GENUINE = "Bonafide"
GENERATED = "_generated"


def _language(folder: Path) -> str:
    try:
        return LANGUAGES[folder.name]
    except KeyError:
        raise RecipeError(f"{folder}: unexpected language folder (expected one of {sorted(LANGUAGES)})") from None


def cvoicefake(root: Path) -> Iterator[Entry]:
    base = next((root / name for name in ("CVoiceFake_Large", "CVoiceFake_Small") if (root / name).is_dir()), root)
    for language_dir in subdirs_only(base, "language"):
        language = _language(language_dir)
        for class_dir in subdirs_only(language_dir, "Bonafide/<vocoder>_generated"):
            if class_dir.name != GENUINE and not class_dir.name.endswith(GENERATED):
                raise RecipeError(f"{class_dir}: unexpected folder (expected {GENUINE}/ or <vocoder>{GENERATED}/)")
            genuine = class_dir.name == GENUINE
            for path in audio_files(class_dir, (".mp3", ".wav")):
                yield Entry(file_id=f"{language_dir.name}-{class_dir.name}-{path.stem}",
                            label="real" if genuine else "fake", path=path,
                            attack="-" if genuine else class_dir.name.removesuffix(GENERATED), language=language)


RECIPES = [Recipe("cvoicefake", "CVoice", cvoicefake, "CVoiceFake, <LANG>/{Bonafide,<vocoder>_generated}/*.mp3")]
