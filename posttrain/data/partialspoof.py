"""A partial-spoof test set from a corpus protocol (the demo corpus): files with a spliced-in segment.

Each file is ``clips_per_file`` recordings of one split concatenated end to end (already trimmed and
level-normalised by the corpus chain, so no level step marks a joint). Three kinds, in turn:

- ``realhost``: real recordings with one fake recording spliced in at an inner position;
- ``fakehost``: fake recordings with one real recording spliced in (the reverse);
- ``real``: real recordings only (bona fide files, so the file-level EER is defined too).

The spliced clip is never first or last, so every spliced file has two interior boundaries. A file
is labelled ``fake`` when any of it is fake (the PartialSpoof utterance convention). The protocol
CSV (``partialspoof.csv``) is an ordinary protocol; the true segments live in a sidecar,
``partialspoof.segments.csv``: ``ID,StartS,EndS,Label,Source``, one row per concatenated clip,
covering each file from 0 to its end without gap. Boundaries are exact sample offsets at 16 kHz
written in seconds (``repr``, so ``round(StartS * 16000)`` gives the sample back). Everything is
drawn from ``random.Random(seed)``: one seed, one set.
"""

from __future__ import annotations

import csv
import io
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.data.files import write_bytes_atomic, write_text_atomic
from posttrain.data.labels import FAKE, LABELS, REAL
from posttrain.data.protocol import ROOT_PLACEHOLDER, ProtocolRow, read_protocol, write_protocol

KINDS = ("realhost", "fakehost", "real")
SEGMENT_COLUMNS = ("ID", "StartS", "EndS", "Label", "Source")
PROTOCOL_NAME, SEGMENTS_NAME = "partialspoof.csv", "partialspoof.segments.csv"
ID_PREFIX = "PARTIAL"


@dataclass(frozen=True)
class Segment:
    """``[start, stop)`` in samples at 16 kHz, its label and the clip it came from."""

    start: int
    stop: int
    label: str
    source: str = "-"

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE_HZ

    @property
    def end_s(self) -> float:
        return self.stop / SAMPLE_RATE_HZ


def spoof_regions(segments: list[Segment]) -> list[tuple[int, int]]:
    """The fake spans of a file in samples, adjacent fake segments merged."""
    regions: list[list[int]] = []
    for segment in segments:
        if segment.label != FAKE:
            continue
        if regions and regions[-1][1] == segment.start:
            regions[-1][1] = segment.stop
        else:
            regions.append([segment.start, segment.stop])
    return [(start, stop) for start, stop in regions]


# ------------------------------------------------------------------------------------- sidecar


def write_segments(segments: dict[str, list[Segment]], path: str | Path) -> None:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SEGMENT_COLUMNS)
    for file_id, file_segments in segments.items():
        for segment in file_segments:
            writer.writerow([file_id, repr(segment.start_s), repr(segment.end_s), segment.label, segment.source])
    write_text_atomic(path, out.getvalue())


def read_segments(path: str | Path) -> dict[str, list[Segment]]:
    """``ID -> segments`` of a segments sidecar; any bad row raises ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: segments file not found (written by `posttrain data partialspoof`)")
    segments: dict[str, list[Segment]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in SEGMENT_COLUMNS[:4] if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing}; expected {list(SEGMENT_COLUMNS)}")
        for record in reader:
            where = f"{path}:{reader.line_num}"
            try:
                start, stop = (round(float(record[key]) * SAMPLE_RATE_HZ) for key in ("StartS", "EndS"))
            except ValueError:
                raise ValueError(f"{where}: StartS/EndS must be numbers, got {record['StartS']!r}, "
                                 f"{record['EndS']!r}") from None
            label = record["Label"].strip()
            if label not in LABELS:
                raise ValueError(f"{where}: Label must be one of {LABELS}, got {label!r}")
            previous = segments[record["ID"]]
            expected_start = previous[-1].stop if previous else 0
            if start != expected_start or stop <= start:
                raise ValueError(f"{where}: {record['ID']}: segment [{record['StartS']}, {record['EndS']}) must "
                                 f"start at {expected_start / SAMPLE_RATE_HZ!r} s (segments cover the file from 0 "
                                 f"without gap or overlap) and end after it starts")
            previous.append(Segment(start, stop, label, record.get("Source") or "-"))
    return dict(segments)


# -------------------------------------------------------------------------------------- builder


@dataclass
class PartialSpoofResult:
    rows: list[ProtocolRow]
    segments: dict[str, list[Segment]]
    protocol_path: Path
    segments_path: Path


def _splice_plan(kind: str, reals: list[ProtocolRow], fakes: list[ProtocolRow], clips: int,
                 rng: random.Random) -> list[ProtocolRow]:
    host, guest = (fakes, reals) if kind == "fakehost" else (reals, fakes)
    plan = rng.sample(host, clips)
    if kind != "real":
        plan[rng.randrange(1, clips - 1)] = rng.choice(guest)  # inner position: two interior boundaries
    return plan


def build_partialspoof(protocol: str | Path, root: str | Path, out: str | Path, *, files: int = 60,
                       clips_per_file: int = 4, seed: int = 0, progress: bool = True) -> PartialSpoofResult:
    """Build ``files`` spliced files from the rows of ``protocol`` (paths under ``root``) into ``out``."""
    if clips_per_file < 3:
        raise ValueError(f"clips_per_file: must be >= 3 (the spliced clip sits between two host clips), "
                         f"got {clips_per_file}")
    if files < 1:
        raise ValueError(f"files: must be >= 1, got {files}")
    rows = read_protocol(protocol)
    by_label = {label: [row for row in rows if row.label == label] for label in (REAL, FAKE)}
    for label, members in by_label.items():
        if len(members) < clips_per_file:
            raise ValueError(f"{protocol}: {len(members)} {label} row(s), need at least clips_per_file="
                             f"{clips_per_file} to build host files")
    out = Path(out)
    rng = random.Random(seed)
    cache: dict[str, np.ndarray] = {}
    protocol_rows, segments = [], {}
    for index in tqdm(range(files), desc="partial spoofs", unit="file", disable=not progress):
        kind = KINDS[index % len(KINDS)]
        plan = _splice_plan(kind, by_label[REAL], by_label[FAKE], clips_per_file, rng)
        waves, file_segments, offset = [], [], 0
        for clip in plan:
            if clip.id not in cache:
                cache[clip.id] = audio.load(clip.resolved_path(root), max_seconds=audio.DEFAULT_MAX_FILE_SECONDS).samples.astype(np.float32)
            waves.append(cache[clip.id])
            file_segments.append(Segment(offset, offset + len(waves[-1]), clip.label, clip.id))
            offset += len(waves[-1])
        file_id = f"{ID_PREFIX}-{kind}-{index:04d}"
        relative = Path("audio") / f"{file_id}.flac"
        write_bytes_atomic(out / relative, audio.encode_flac(np.concatenate(waves)))
        label = FAKE if any(segment.label == FAKE for segment in file_segments) else REAL
        languages = sorted({clip.language for clip in plan})
        protocol_rows.append(ProtocolRow(
            id=file_id, label=label, duration_s=offset / SAMPLE_RATE_HZ,
            path=f"{ROOT_PLACEHOLDER}/{relative.as_posix()}", sample_rate_hz=SAMPLE_RATE_HZ,
            attack="-" if kind == "real" else f"partial-{kind}", speaker="-", proportion="test",
            audio_channel="1", audio_encoding="FLAC", audio_bit_sample="16",
            language=languages[0] if len(languages) == 1 else "mixed"))
        segments[file_id] = file_segments
    protocol_path, segments_path = out / PROTOCOL_NAME, out / SEGMENTS_NAME
    write_protocol(protocol_rows, protocol_path)
    write_segments(segments, segments_path)
    return PartialSpoofResult(protocol_rows, segments, protocol_path, segments_path)
