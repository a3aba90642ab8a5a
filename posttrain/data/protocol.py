"""Protocol CSVs: the AntiDeepfake format every corpus is converted to (one row per audio file).

Columns: ``ID,Label,Duration,SampleRate,Path,Attack,Speaker,Proportion,AudioChannel,AudioEncoding,
AudioBitSample,Language``. ``ID`` is ``<CORPUS_PREFIX>-<file id>``; ``Label`` is real|fake;
``Path`` may start with ``$ROOT`` (replaced by a data root); ``Proportion`` is train|valid|test|-.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from posttrain.data.files import write_text_atomic
from posttrain.data.labels import LABELS

COLUMNS = ("ID", "Label", "Duration", "SampleRate", "Path", "Attack", "Speaker", "Proportion",
           "AudioChannel", "AudioEncoding", "AudioBitSample", "Language")
REQUIRED_COLUMNS = ("ID", "Label", "Duration", "Path")
PROPORTIONS = ("train", "valid", "test", "-")
ROOT_PLACEHOLDER = "$ROOT"


class ProtocolError(ValueError):
    """Protocol CSV problems, each located by file and line; all of them in one error.

    ``problems`` lists ``(path, line, message)``; ``path``/``line`` are the first problem's.
    """

    def __init__(self, path: str | Path, line: int | None, message: str,
                 problems: list[tuple[str, int | None, str]] | None = None):
        self.problems = problems or [(str(path), line, message)]
        self.path, self.line = self.problems[0][0], self.problems[0][1]
        lines = [f"{where}:{at}: {text}" if at is not None else f"{where}: {text}"
                 for where, at, text in self.problems]
        summary = lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines)
        super().__init__(summary)

    @classmethod
    def collect(cls, problems: list[tuple[str, int | None, str]]) -> "ProtocolError":
        return cls(problems[0][0], problems[0][1], problems[0][2], problems)


@dataclass
class ProtocolRow:
    id: str
    label: str
    duration_s: float
    path: str
    sample_rate_hz: int = 0  # 0 = unknown
    attack: str = "-"
    speaker: str = "-"
    proportion: str = "-"
    audio_channel: str = "-"
    audio_encoding: str = "-"
    audio_bit_sample: str = "-"
    language: str = "-"

    @property
    def corpus(self) -> str:
        """The corpus prefix of the ID: per-corpus results group by it."""
        return self.id.split("-", 1)[0]

    def resolved_path(self, root: str | Path | None) -> Path:
        if self.path.startswith(ROOT_PLACEHOLDER):
            if root is None:
                raise ValueError(f"{self.id}: path {self.path!r} uses {ROOT_PLACEHOLDER} but no data root was given")
            return Path(root) / self.path[len(ROOT_PLACEHOLDER):].lstrip("/")
        path = Path(self.path)
        return path if path.is_absolute() or root is None else Path(root) / path

    def to_csv_row(self) -> list[str]:
        return [self.id, self.label, f"{self.duration_s:.6g}", str(self.sample_rate_hz or "-"), self.path,
                self.attack, self.speaker, self.proportion, self.audio_channel, self.audio_encoding,
                self.audio_bit_sample, self.language]


_OPTIONAL_FIELDS = {"Attack": "attack", "Speaker": "speaker", "AudioChannel": "audio_channel",
                    "AudioEncoding": "audio_encoding", "AudioBitSample": "audio_bit_sample", "Language": "language"}


def _parse_row(record: dict[str, str], path: Path, line: int) -> ProtocolRow:
    def value(column: str) -> str:
        return (record.get(column) or "").strip()

    row_id = value("ID")
    if not row_id:
        raise ProtocolError(path, line, "empty ID")
    label = value("Label").lower()
    if label not in LABELS:
        raise ProtocolError(path, line, f"{row_id}: unknown label {value('Label')!r} (expected real or fake)")
    try:
        duration_s = float(value("Duration"))
    except ValueError:
        raise ProtocolError(path, line, f"{row_id}: bad duration {value('Duration')!r}") from None
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ProtocolError(path, line, f"{row_id}: duration must be a positive number, got {duration_s}")
    rate = value("SampleRate")
    try:
        sample_rate_hz = int(float(rate)) if rate not in ("", "-") else 0
    except ValueError:
        raise ProtocolError(path, line, f"{row_id}: bad sample rate {rate!r}") from None
    proportion = value("Proportion") or "-"
    if proportion not in PROPORTIONS:
        raise ProtocolError(path, line, f"{row_id}: unknown proportion {proportion!r} (expected {PROPORTIONS})")
    audio_path = value("Path")
    if not audio_path:
        raise ProtocolError(path, line, f"{row_id}: empty Path")
    optional = {field: value(column) or "-" for column, field in _OPTIONAL_FIELDS.items()}
    return ProtocolRow(id=row_id, label=label, duration_s=duration_s, path=audio_path,
                       sample_rate_hz=sample_rate_hz, proportion=proportion, **optional)


def _read_rows(path: Path, problems: list[tuple[str, int | None, str]]) -> list[tuple[int, ProtocolRow]]:
    """Parse every row, appending each bad one to ``problems``; returns ``(line, row)`` of the good ones."""
    rows: list[tuple[int, ProtocolRow]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [column for column in REQUIRED_COLUMNS if column not in header]
        if missing:
            problems.append((str(path), 1, f"missing column(s) {missing}; header is {header}"))
            return rows
        for fields in reader:
            line = reader.line_num
            if not any(field.strip() for field in fields):
                continue  # blank line
            if len(fields) != len(header):
                problems.append((str(path), line, f"{len(fields)} fields, header has {len(header)}"))
                continue
            try:
                rows.append((line, _parse_row(dict(zip(header, fields)), path, line)))
            except ProtocolError as error:
                problems.extend(error.problems)
    return rows


def read_protocols(paths: Iterable[str | Path]) -> list[ProtocolRow]:
    """Read and validate protocol CSVs; IDs must be unique across all of them.

    Every bad row of every file is reported at once in one ``ProtocolError`` (file:line each),
    so a user fixes a CSV in one pass rather than one error per run.
    """
    problems: list[tuple[str, int | None, str]] = []
    rows: list[ProtocolRow] = []
    first_seen: dict[str, str] = {}
    for path in map(Path, paths):
        if not path.is_file():
            problems.append((str(path), None, "protocol file not found"))
            continue
        file_problems: list[tuple[str, int | None, str]] = []
        for line, row in _read_rows(path, file_problems):
            if row.id in first_seen:
                file_problems.append((str(path), line, f"duplicate ID {row.id!r} (first at {first_seen[row.id]})"))
                continue
            first_seen[row.id] = f"{path}:{line}"
            rows.append(row)
        problems += sorted(file_problems, key=lambda problem: problem[1] or 0)
    if problems:
        raise ProtocolError.collect(problems)
    return rows


def read_protocol(path: str | Path) -> list[ProtocolRow]:
    """Read and validate one protocol CSV (see ``read_protocols``)."""
    return read_protocols([path])


def write_protocol(rows: Iterable[ProtocolRow], path: str | Path) -> int:
    """Write rows atomically (temp file + rename); returns the number of rows."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(row.to_csv_row())
        count += 1
    write_text_atomic(path, buffer.getvalue())
    return count


def row_to_dict(row: ProtocolRow) -> dict[str, object]:
    return {**asdict(row), "corpus": row.corpus}
