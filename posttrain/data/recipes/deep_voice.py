"""DEEP-VOICE (Bird & Lotfi, 2023): public-figure speech and RVC voice conversions of it.

AntiDeepfake does not score the long Kaggle recordings: it scores ~6.6k overlapping segments whose sample
boundaries its repository lists in ``protocols/DeepVoice_seg_log.txt``. This recipe reads those segments
(cut them first with ``posttrain data deepvoice-segments``, or AD's own DeepVoice_seg_reproduce.py)::

    AUDIO_SEGMENTS/REAL/<speaker>-original_seg_<n>.wav
    AUDIO_SEGMENTS/FAKE/<source>-to-<target>_seg_<n>.wav      <source>'s speech in <target>'s voice

IDs are AD's ``DeepVoice-VC_<segment stem>``; no split (Proportion ``-``). Speaker is the voice heard (the
target of a conversion); Attack ``rvc``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from posttrain.data.recipes.base import Entry, Recipe, RecipeError, audio_files, check_name, require_dir

SEGMENTS = "AUDIO_SEGMENTS"
NAMES = {"real": re.compile(r"(?P<speaker>[A-Za-z0-9_]+?)-original_seg_\d+\.wav"),
         "fake": re.compile(r"[A-Za-z0-9_]+?-to-(?P<speaker>[A-Za-z0-9_]+?)_seg_\d+\.wav")}
# One segment of AD's log: "Audio: <recording>_seg_<n>, start at: <sample>, end at: <sample>".
LOG_LINE = re.compile(r"Audio:\s*(?P<name>.*)_seg_(?P<index>\d+), start at: (?P<start>\d+), end at: (?P<end>\d+)")


def deep_voice(root: Path) -> Iterator[Entry]:
    base = root / SEGMENTS if (root / SEGMENTS).is_dir() else root
    if (base / "AUDIO").is_dir() and not (base / "REAL").is_dir():
        raise RecipeError(f"{base}: holds the whole recordings (AUDIO/), not AntiDeepfake's {SEGMENTS}/; cut them "
                          f"with `posttrain data deepvoice-segments --log DeepVoice_seg_log.txt --root {base}`")
    for label, pattern in NAMES.items():
        for path in audio_files(require_dir(base / label.upper(), f"{label.upper()}/"), (".wav",)):
            speaker = check_name(pattern, path).group("speaker")
            yield Entry(file_id=f"VC_{path.stem}", label=label, path=path, attack="-" if label == "real" else "rvc",
                        speaker=speaker, language="en")


def read_segment_log(log: Path) -> dict[str, list[tuple[int, int, int]]]:
    """AD's segment log: recording name -> [(segment index, start sample, end sample)], in log order."""
    segments: dict[str, list[tuple[int, int, int]]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        match = LOG_LINE.search(line)
        if match:
            segments.setdefault(match["name"], []).append(
                (int(match["index"]), int(match["start"]), int(match["end"])))
    if not segments:
        raise RecipeError(f"{log}: no 'Audio: <name>_seg_<n>, start at: .., end at: ..' lines")
    return segments


def cut_segments(log: Path, root: Path) -> list[str]:
    """Cut ``root/AUDIO/{REAL,FAKE}/<name>.wav`` into ``root/AUDIO_SEGMENTS`` at AD's logged sample bounds
    (clamped to the recording, as AD's reproduction script does). Returns the recordings the log names
    that are missing (reported, not fatal: AD skips them too)."""
    missing = []
    for name, segments in read_segment_log(log).items():
        folder = "FAKE" if "-to-" in name else "REAL"
        source = root / "AUDIO" / folder / f"{name}.wav"
        if not source.is_file():
            missing.append(str(source))
            continue
        audio, rate = sf.read(str(source), dtype="float32", always_2d=True)
        out_dir = root / SEGMENTS / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, start, end in segments:
            piece = np.ascontiguousarray(audio[max(0, start):min(end, len(audio))])
            # 32-bit float, as torchaudio.save writes AD's float tensors: the samples stay exactly AD's.
            sf.write(str(out_dir / f"{name}_seg_{index}.wav"), piece, rate, subtype="FLOAT")
    return missing


RECIPES = [Recipe("deep_voice", "DeepVoice", deep_voice,
                  f"DEEP-VOICE as AD scores it, {SEGMENTS}/{{REAL,FAKE}}/*_seg_<n>.wav")]
