"""VoiceMOS: the Blizzard Challenge listening-test releases (natural speech and the entries' synthetic speech).

Layout (as AntiDeepfake prepared it; the root holds ``main/blizzard/`` or is that folder)::

    blizzard_wavs_and_scores_<year>_release_version_<n>/<system>/.../<file>.wav
        e.g. blizzard_wavs_and_scores_2010_release_version_1/N/
             submission_directory/mandarin/MH1/2010/news/wavs/news_2010_0095.wav

System ``A`` is natural speech in every Blizzard Challenge -> real; every other system letter -> fake
(its letter is the attack, ``<year>-<letter>``). The nesting below the system folder differs between
years and is taken as it is; a wav file anywhere else in a release is an error. IDs are AntiDeepfake's
``VoiceMOS-<n>-<file stem>``: ``n`` numbers every wav file under ``main/blizzard`` from 0, in the order of
their sorted path strings (as AD's sorted glob does), so file names recurring across systems stay apart;
the releases' score tables and text files are not read. Language: from an ``english`` / ``mandarin`` folder on the path, else ``-``. Proportion ``-``.
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


def _wav_files(release: Path) -> list[Path]:
    """The release's wav files that a recursive glob sees (no hidden file or folder on the way)."""
    return [path for path in release.rglob("*.wav")
            if not any(part.startswith(".") for part in path.relative_to(release).parts)]


def _entry(number: int, release: Path, path: Path) -> Entry:
    year = check_name(RELEASE, release).group("year")
    system, *inner = path.relative_to(release).parts
    if not inner or SYSTEM.fullmatch(system) is None:
        raise RecipeError(f"{path}: wav file outside a system folder (expected <release>/<A-Z>/.../*.wav)")
    language = next((LANGUAGES[part.lower()] for part in inner if part.lower() in LANGUAGES), "-")
    genuine = system == NATURAL
    return Entry(file_id=f"{number}-{path.stem}", label="real" if genuine else "fake", path=path,
                 attack="-" if genuine else f"{year}-{system}", language=language)


def voicemos(root: Path) -> Iterator[Entry]:
    base = root / "main" / "blizzard" if (root / "main" / "blizzard").is_dir() else root
    files = [(release, path) for release in subdirs_only(base, "release") for path in _wav_files(release)]
    # String order, not Path order: "a/b.wav" sorts before "a/b/c.wav" as in AD's sorted(glob(...)).
    files.sort(key=lambda item: item[1].as_posix())
    for number, (release, path) in enumerate(files):
        yield _entry(number, release, path)


RECIPES = [Recipe("voicemos", "VoiceMOS", voicemos,
                  "VoiceMOS / Blizzard releases, blizzard_wavs_and_scores_<year>_*/<system>/.../*.wav")]
