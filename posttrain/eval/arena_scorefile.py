"""The Speech Anti-Spoofing Arena's score file, written beside posttrain's own for a leaderboard submission.

What the Arena takes (its benchmark datasets' ``submissions/README.md``, submission schema 4, read on the
Hugging Face hub, SpeechAntiSpoofingBenchmarks/ASVspoof2019_LA at 151aa4c): per benchmark dataset, one
``scores.txt`` with one line per utterance, ``<utterance_id> <score>``, separated by a space, higher = more
bona fide. The file is uploaded to the submitter's own model repo under
``.eval_results/SpeechAntiSpoofingBenchmarks/<dataset>/scores.txt``; a pull request to the dataset repo then
adds a YAML naming that upload's pinned URL (``/resolve/<commit>/``, not ``main``) and the file's sha256,
and a maintainer re-scores it. Those two steps need the upload's commit, so they stay the user's.

The score is posttrain's own (``ScoreTable.scores``): any score that rises with P(bona fide) gives the
Arena the same EER, so the file carries no extra transform. The labels are not in it (the Arena holds
them); an id with whitespace cannot be written in this format, and the file is then left out with a
warning rather than written with ids the Arena would split.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from posttrain.data.files import write_bytes_atomic

ScoreTable = Any  # posttrain.eval.report.ScoreTable (report imports this module: no import back)

ARENA_SCORES = "arena_scores.txt"  # the file's name in a report folder
_WHITESPACE = re.compile(r"\s")

log = logging.getLogger(__name__)


def arena_text(table: ScoreTable) -> str | None:
    """``table`` as the Arena's ``scores.txt`` (module docstring), or None when an id holds whitespace."""
    spaced = next((sample_id for sample_id in table.ids if not sample_id or _WHITESPACE.search(sample_id)), None)
    if spaced is not None:
        log.warning("%s not written: trial id %r is empty or holds whitespace, which the Arena's "
                    "'<utterance_id> <score>' lines cannot carry", ARENA_SCORES, spaced)
        return None
    return "".join(f"{sample_id} {float(score)!r}\n" for sample_id, score in zip(table.ids, table.scores.tolist()))


def write_arena_scores(path: str | Path, table: ScoreTable) -> Path | None:
    """Write ``table`` as the Arena's score file (atomically); the path, or None when not written."""
    text = arena_text(table)
    if text is None:
        return None
    write_bytes_atomic(path, text.encode("utf-8"))
    return Path(path)
