"""WaveFake: LJSpeech / JSUT sentences re-synthesised by neural vocoders (all FAKE).

Layout (the root holds ``generated_audio/`` or is it)::

    generated_audio/<generator>/<utterance>_gen.wav     e.g. ljspeech_melgan/LJ001-0001_gen.wav

The generator folder is the attack; its dataset prefix gives language and speaker: ``ljspeech_*``
and ``common_voices_*`` (TTS trained on LJSpeech) -> en / LJ, ``jsut_*`` -> ja / JSUT. The genuine
references (LJSpeech, JSUT) are separate corpora. IDs are AntiDeepfake's ``WF-<generator>_<utterance>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, subdirs

SOURCES = {"ljspeech": ("en", "LJ"), "common_voices": ("en", "LJ"), "jsut": ("ja", "JSUT")}


def _source(generator: Path) -> tuple[str, str]:
    for prefix, source in SOURCES.items():
        if generator.name.startswith(prefix + "_"):
            return source
    raise RecipeError(f"{generator}: unexpected generator folder (expected a name starting with one of "
                      f"{[prefix + '_' for prefix in SOURCES]})")


def wavefake(root: Path) -> Iterator[Entry]:
    base = root / "generated_audio" if (root / "generated_audio").is_dir() else root
    stray = [path for path in base.iterdir() if path.is_file() and not path.name.startswith(".")]
    if stray:
        raise RecipeError(f"{stray[0]}: unexpected file outside a generator folder")
    for generator in subdirs(base):
        language, speaker = _source(generator)
        for path in audio_files(generator, (".wav",)):
            yield Entry(file_id=f"{generator.name}_{path.stem}", label="fake", path=path,
                        attack=generator.name, speaker=speaker, language=language)


RECIPES = [Recipe("wavefake", "WF", wavefake, "WaveFake, generated_audio/<generator>/*.wav")]
