"""VoiceMOS: the Blizzard Challenge listening-test releases (natural speech and the entries' synthetic speech).

Layout (as AntiDeepfake prepared it; the root holds ``main/blizzard/`` or is that folder)::

    blizzard_wavs_and_scores_<year>_release_version_<n>/<system>/.../<file>.wav
        e.g. blizzard_wavs_and_scores_2010_release_version_1/N/
             submission_directory/mandarin/MH1/2010/news/wavs/news_2010_0095.wav

System ``A`` is natural speech in every Blizzard Challenge -> real; every other system letter -> fake
(its letter is the attack, ``<year>-<letter>``). The nesting below the system folder differs between
years and is taken as it is (the ID joins it: ``VoiceMOS-<year>-<system>-<sub folders>-<file>``);
a wav file anywhere else in a release is an error; the releases' score tables and text files are not
read. Language: from an ``english`` / ``mandarin`` folder on the path, else ``-``. Proportion ``-``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, check_name
from posttrain.data.recipes.folders import subdirs_only

RELEASE = re.compile(r"blizzard_wavs_and_scores_(?P<year>\d{4})_release_version_\d+")
SYSTEM = re.compile(r"[A-Z]")
NATURAL = "A"
LANGUAGES = {"english": "en", "mandarin": "zh"}


def _release(folder: Path) -> Iterator[Entry]:
    year = check_name(RELEASE, folder).group("year")
    for path in sorted(folder.rglob("*.wav")):
        system, *inner = path.relative_to(folder).parts
        if not inner or SYSTEM.fullmatch(system) is None:
            raise RecipeError(f"{path}: wav file outside a system folder (expected <release>/<A-Z>/.../*.wav)")
        language = next((LANGUAGES[part.lower()] for part in inner if part.lower() in LANGUAGES), "-")
        genuine = system == NATURAL
        yield Entry(file_id="-".join((year, system, *inner[:-1], path.stem)), label="real" if genuine else "fake",
                    path=path, attack="-" if genuine else f"{year}-{system}", language=language)


def voicemos(root: Path) -> Iterator[Entry]:
    base = root / "main" / "blizzard" if (root / "main" / "blizzard").is_dir() else root
    for release in subdirs_only(base, "release"):
        yield from _release(release)


RECIPES = [Recipe("voicemos", "VoiceMOS", voicemos,
                  "VoiceMOS / Blizzard releases, blizzard_wavs_and_scores_<year>_*/<system>/.../*.wav")]
