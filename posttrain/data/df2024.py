"""Deepfake-Eval-2024: metadata -> protocol CSVs, transcoding to 16 kHz mono FLAC, fixed-length segments.

Input: the published metadata CSV (``Filename, Date, Ground Truth, Public Comments, Finetuning Set``;
column names may carry their value hints, e.g. ``Ground Truth (Real/Fake)``) and the audio folder
(mp3, m4a, mp4, wav). Label: Ground Truth Real -> real, Fake -> fake. Split: Finetuning Set Train ->
train, Test -> test. A row with another value, an empty file name or a duplicate stem is an error
naming its line; with ``skip_bad_rows`` (AntiDeepfake's behaviour: its preprocessing skips such rows)
it is left out instead and listed in rejects.csv with its line and reason.

Output folder::

    audio/full/<stem>.flac                     every file, decoded (ffmpeg for m4a/mp4), mono, 16 kHz
    full/{train,test}.csv                      protocol of the whole files (ID DF2024-<stem>)
    audio/<N>s/<stem>-<k>.flac                 non-overlapping N-second segments, k = 0, 1, ...
    <N>s/{train,test}.csv                      protocol of the segments (ID DF2024-<stem>-<N>s-<k>)
    <N>s/segments.csv                          segment -> source file mapping with sample boundaries
    rejects.csv                                files that are missing or cannot be decoded (counted, skipped)
    shards/<N>s/<split>/                       with ``shards=True``: WebDataset shards of the segments

Segmentation: segment k covers samples [k*N*16000, min((k+1)*N*16000, length)); the last segment
is shorter. A last piece shorter than ``min_segment_seconds`` is dropped, unless it is the file's
only piece (a short file still yields one segment). ``min_segment_seconds=0`` keeps every last piece,
however short, as AntiDeepfake's segmentation does.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.data.files import write_bytes_atomic
from posttrain.data.protocol import ROOT_PLACEHOLDER, ProtocolRow, write_protocol

log = logging.getLogger(__name__)

PREFIX = "DF2024"
SEGMENT_SECONDS = (4, 10, 13, 30, 50)
DEFAULT_MIN_SEGMENT_SECONDS = 1.0
SPLITS = ("train", "test")
MAPPING_COLUMNS = ("segment_id", "file_id", "filename", "index", "start_sample", "end_sample", "start_s", "end_s",
                   "label", "split")
COLUMN_PREFIXES = {"filename": "Filename", "label": "Ground Truth", "split": "Finetuning Set"}
LABELS = {"real": "real", "fake": "fake"}
SPLIT_VALUES = {"train": "train", "test": "test"}


class MetadataError(ValueError):
    """A Deepfake-Eval-2024 metadata problem, naming the file and line."""


@dataclass(frozen=True)
class SourceFile:
    filename: str
    label: str
    split: str
    line: int

    @property
    def stem(self) -> str:
        return Path(self.filename).stem

    @property
    def file_id(self) -> str:
        return f"{PREFIX}-{self.stem}"


@dataclass(frozen=True)
class Segment:
    index: int
    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class BadRow:
    """A metadata row left out (``skip_bad_rows``): where it is and why."""

    line: int
    filename: str
    reason: str


@dataclass
class Df2024Result:
    files: list[SourceFile]
    rows_full: list[ProtocolRow]
    rows_by_length: dict[int, list[ProtocolRow]]
    rejects: list[tuple[SourceFile, str]]
    bad_rows: list[BadRow] = field(default_factory=list)
    csv_paths: list[Path] = field(default_factory=list)
    shard_dirs: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# metadata


def _columns(header: list[str], path: Path) -> dict[str, str]:
    columns = {}
    for key, prefix in COLUMN_PREFIXES.items():
        matches = [name for name in header if name.strip().lower().startswith(prefix.lower())]
        if len(matches) != 1:
            raise MetadataError(f"{path}:1: expected one column starting with {prefix!r}, header is {header}")
        columns[key] = matches[0]
    return columns


def _value(record: dict[str, str], column: str, allowed: dict[str, str], where: str) -> str:
    raw = (record.get(column) or "").strip()
    if raw.lower() not in allowed:
        raise MetadataError(f"{where}: {column} is {raw!r}, expected one of {sorted(allowed)} (any case)")
    return allowed[raw.lower()]


def _source(record: dict[str, str], columns: dict[str, str], line: int, where: str,
            seen: dict[str, int]) -> SourceFile:
    if None in record:
        raise MetadataError(f"{where}: more fields than the header")
    filename = (record.get(columns["filename"]) or "").strip()
    if not filename or Path(filename).name != filename:
        raise MetadataError(f"{where}: bad Filename {filename!r} (a plain file name is expected)")
    source = SourceFile(filename, _value(record, columns["label"], LABELS, where),
                        _value(record, columns["split"], SPLIT_VALUES, where), line)
    if source.stem in seen:
        raise MetadataError(f"{where}: file stem {source.stem!r} repeats line {seen[source.stem]}")
    return source


def read_metadata(path: str | Path, *, skip_bad_rows: bool = False) -> tuple[list[SourceFile], list[BadRow]]:
    """Parse and validate the metadata CSV. The first bad row raises ``MetadataError`` with its line, or,
    with ``skip_bad_rows``, is left out and returned among the bad rows."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    files: list[SourceFile] = []
    bad_rows: list[BadRow] = []
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = _columns(list(reader.fieldnames or []), path)
        for record in reader:
            where = f"{path}:{reader.line_num}"
            try:
                source = _source(record, columns, reader.line_num, where, seen)
            except MetadataError as error:
                if not skip_bad_rows:
                    raise
                filename = str(record.get(columns["filename"]) or "").strip()
                bad_rows.append(BadRow(reader.line_num, filename, str(error).removeprefix(f"{where}: ")))
                continue
            seen[source.stem] = reader.line_num
            files.append(source)
    if not files:
        raise MetadataError(f"{path}: no rows" + (f" left ({len(bad_rows)} bad rows skipped)" if bad_rows else ""))
    return files, bad_rows


# ------------------------------------------------------------------------------------------------
# segmentation


def segment_bounds(num_samples: int, segment_seconds: float, min_segment_seconds: float,
                   sample_rate_hz: int = SAMPLE_RATE_HZ) -> list[Segment]:
    """Non-overlapping segments of ``segment_seconds``; see the module docstring for the last piece."""
    size = int(round(segment_seconds * sample_rate_hz))
    minimum = int(round(min_segment_seconds * sample_rate_hz))
    segments = [Segment(index, start, min(start + size, num_samples))
                for index, start in enumerate(range(0, num_samples, size))]
    if len(segments) > 1 and segments[-1].end_sample - segments[-1].start_sample < minimum:
        segments.pop()
    return segments


# ------------------------------------------------------------------------------------------------
# per-file work (runs in worker processes)


@dataclass(frozen=True)
class _Job:
    source: SourceFile
    audio_path: Path
    out: Path
    segment_seconds: tuple[int, ...]
    min_segment_seconds: float


@dataclass(frozen=True)
class _Done:
    source: SourceFile
    num_samples: int
    orig_sample_rate_hz: int
    segments: dict[int, list[Segment]]
    error: str = ""


def full_relative(source: SourceFile) -> Path:
    return Path("audio") / "full" / f"{source.stem}.flac"


def segment_relative(source: SourceFile, length_s: int, segment: Segment) -> Path:
    return Path("audio") / f"{length_s}s" / f"{source.stem}-{segment.index}.flac"


def _process(job: _Job) -> _Done:
    try:
        waveform = audio.load(job.audio_path, max_seconds=audio.DEFAULT_MAX_FILE_SECONDS)
    except audio.AudioError as error:
        return _Done(job.source, 0, 0, {}, str(error))
    samples = waveform.samples
    for warning in waveform.warnings:  # cut by what was decoded; the header's disagreement is logged
        log.warning("%s: %s", job.source.filename, warning)
    write_bytes_atomic(job.out / full_relative(job.source), audio.encode_flac(samples))
    segments = {}
    for length_s in job.segment_seconds:
        segments[length_s] = segment_bounds(len(samples), length_s, job.min_segment_seconds)
        for segment in segments[length_s]:
            write_bytes_atomic(job.out / segment_relative(job.source, length_s, segment),
                               audio.encode_flac(samples[segment.start_sample:segment.end_sample]))
    return _Done(job.source, len(samples), waveform.orig_sample_rate_hz, segments)


def _run(jobs: list[_Job], num_workers: int, progress: bool) -> Iterator[_Done]:
    bar = dict(total=len(jobs), desc="df2024 files", unit="file", disable=not progress)
    if num_workers <= 1:
        yield from tqdm(map(_process, jobs), **bar)
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        yield from tqdm(pool.map(_process, jobs, chunksize=4), **bar)


# ------------------------------------------------------------------------------------------------
# protocol rows, mapping, shards


def _row(row_id: str, source: SourceFile, relative: Path, num_samples: int) -> ProtocolRow:
    return ProtocolRow(id=row_id, label=source.label, duration_s=num_samples / SAMPLE_RATE_HZ,
                       path=f"{ROOT_PLACEHOLDER}/{relative.as_posix()}", sample_rate_hz=SAMPLE_RATE_HZ,
                       proportion=source.split, audio_channel="1", audio_encoding="FLAC", audio_bit_sample="16")


def segment_id(source: SourceFile, length_s: int, segment: Segment) -> str:
    return f"{source.file_id}-{length_s}s-{segment.index}"


def _write_csv(path: Path, header: Iterable[str], records: Iterable[Iterable[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(records)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))


def _write_mapping(path: Path, done: Iterable[_Done], length_s: int) -> None:
    rate = SAMPLE_RATE_HZ
    _write_csv(path, MAPPING_COLUMNS, [
        (segment_id(item.source, length_s, segment), item.source.file_id, item.source.filename, segment.index,
         segment.start_sample, segment.end_sample, f"{segment.start_sample / rate:.4f}",
         f"{segment.end_sample / rate:.4f}", item.source.label, item.source.split)
        for item in done for segment in item.segments[length_s]])


def _write_split_csvs(folder: Path, rows: list[ProtocolRow]) -> list[Path]:
    paths = []
    for split in SPLITS:
        paths.append(folder / f"{split}.csv")
        write_protocol([row for row in rows if row.proportion == split], paths[-1])
    return paths


def prepare_df2024(metadata: str | Path, audio_dir: str | Path, out: str | Path, *,
                   segment_seconds: Iterable[int] = SEGMENT_SECONDS,
                   min_segment_seconds: float = DEFAULT_MIN_SEGMENT_SECONDS, skip_bad_rows: bool = False,
                   shards: bool = False, num_workers: int = 1, seed: int = 0, progress: bool = True) -> Df2024Result:
    """Run the whole preparation (see the module docstring); returns what was written."""
    if min_segment_seconds < 0:
        raise ValueError(f"min_segment_seconds must be >= 0, got {min_segment_seconds}")
    files, bad_rows = read_metadata(metadata, skip_bad_rows=skip_bad_rows)
    audio_dir, out = Path(audio_dir), Path(out)
    lengths = tuple(sorted(set(int(length) for length in segment_seconds)))
    if not lengths or lengths[0] <= 0:
        raise ValueError(f"segment_seconds must be positive, got {list(segment_seconds)}")
    jobs = [_Job(source, audio_dir / source.filename, out, lengths, min_segment_seconds) for source in files]
    done, rejects = [], []
    for item in _run(jobs, num_workers, progress):
        if item.error:
            rejects.append((item.source, item.error))
        else:
            done.append(item)
    result = Df2024Result(files, [], {length: [] for length in lengths}, rejects, bad_rows)
    for item in done:
        result.rows_full.append(_row(item.source.file_id, item.source, full_relative(item.source), item.num_samples))
        for length in lengths:
            result.rows_by_length[length] += [
                _row(segment_id(item.source, length, segment), item.source,
                     segment_relative(item.source, length, segment), segment.end_sample - segment.start_sample)
                for segment in item.segments[length]]
    result.csv_paths += _write_split_csvs(out / "full", result.rows_full)
    for length in lengths:
        result.csv_paths += _write_split_csvs(out / f"{length}s", result.rows_by_length[length])
        _write_mapping(out / f"{length}s" / "segments.csv", done, length)
    _write_csv(out / "rejects.csv", ("filename", "line", "reason"),
               sorted([(source.filename, source.line, reason) for source, reason in rejects]
                      + [(bad.filename, bad.line, f"metadata row skipped: {bad.reason}") for bad in bad_rows],
                      key=lambda record: record[1]))
    if shards:
        result.shard_dirs = _build_shards(out, lengths, result.rows_by_length, seed, progress)
    return result


def _build_shards(out: Path, lengths: tuple[int, ...], rows_by_length: dict[int, list[ProtocolRow]], seed: int,
                  progress: bool) -> list[Path]:
    from posttrain.data.shard_build import build_shards

    built = []
    for length in lengths:
        for split in SPLITS:
            if not any(row.proportion == split for row in rows_by_length[length]):
                continue
            target = out / "shards" / f"{length}s" / split
            build_shards([out / f"{length}s" / f"{split}.csv"], out, target, name=f"df2024_{length}s_{split}",
                         split=split, seed=seed, progress=progress)
            built.append(target)
    return built


def summary(result: Df2024Result) -> str:
    counts = Counter((row.proportion, row.label) for row in result.rows_full)
    hours = sum(row.duration_s for row in result.rows_full) / 3600
    lines = [f"{len(result.rows_full)} files ({hours:.2f} h): "
             + ", ".join(f"{split}/{label} {n}" for (split, label), n in sorted(counts.items()))]
    lines += [f"  {length:>2} s segments: {len(rows)}" for length, rows in result.rows_by_length.items()]
    if result.bad_rows:
        first = result.bad_rows[0]
        lines.append(f"  {len(result.bad_rows)} metadata row(s) skipped (see rejects.csv): line {first.line}: "
                     f"{first.reason[:200]}")
    if result.rejects:
        lines.append(f"  {len(result.rejects)} rejected (see rejects.csv): {result.rejects[0][0].filename}: "
                     f"{result.rejects[0][1][:200]}")
    lines += [f"  shards: {path}" for path in result.shard_dirs]
    return "\n".join(lines)
