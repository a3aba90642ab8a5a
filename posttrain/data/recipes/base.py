"""Shared plumbing of the corpus recipes: entries, layout errors, table reading, audio headers, rows.

A recipe only parses its corpus layout into ``Entry`` objects (which file, which label, split, attack,
speaker, language); ``build_rows`` then reads every audio header (soundfile; ffprobe for containers
libsndfile cannot open, such as VoxCeleb2's m4a) on a thread pool and turns entries into protocol rows
with ``$ROOT``-relative paths. Header reads are I/O bound, so threads overlap the file-system latency
that dominates on network storage.
"""

from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from posttrain.data import audio
from posttrain.data.audio import AudioInfo
from posttrain.data.labels import LABELS
from posttrain.data.protocol import ROOT_PLACEHOLDER, ProtocolRow

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus")

# Official split folder/file names -> protocol proportions.
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "dev": "valid", "development": "valid", "validation": "valid", "valid": "valid",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
}


class RecipeError(ValueError):
    """A corpus layout that does not match its recipe; the message names the file (and line)."""


@dataclass(frozen=True)
class Entry:
    """One audio file of a corpus as its layout describes it (before its header is read)."""

    file_id: str  # the ID without the corpus prefix
    label: str  # real | fake
    path: Path  # absolute path under the corpus root
    proportion: str = "-"
    attack: str = "-"
    speaker: str = "-"
    language: str = "-"
    source: str = ""  # where the entry came from ("protocol.txt:12"), for error messages


@dataclass(frozen=True)
class Recipe:
    """A corpus layout: ``entries(root)`` lists its files; IDs become ``<prefix>-<file_id>``."""

    name: str
    prefix: str
    entries: Callable[[Path], Iterable[Entry]]
    summary: str
    # where the recipe leaves data out on purpose, as AntiDeepfake does: printed by `data prepare`
    parity_note: str = ""


@dataclass
class PrepareResult:
    rows: list[ProtocolRow]
    skipped: list[str]  # "path: reason (detail)" for each file left out (only with skip_missing)
    rejects: list[dict] = field(default_factory=list)  # the same as rejects.jsonl lines: path, reason, detail, listed_at


# ----------------------------------------------------------------------------------------------
# layout helpers


def split_of(name: str, where: str | Path) -> str:
    """Map an official split name (train, dev, evaluation, ...) to a protocol proportion."""
    try:
        return SPLIT_NAMES[name.lower()]
    except KeyError:
        raise RecipeError(f"{where}: unknown split name {name!r} (expected one of {sorted(SPLIT_NAMES)})") from None


def label_of(value: str, real: Iterable[str], fake: Iterable[str], where: str) -> str:
    """Map a corpus' own label word to real|fake; anything else is a layout error."""
    word = value.strip().lower()
    if word in real:
        return "real"
    if word in fake:
        return "fake"
    raise RecipeError(f"{where}: unknown label {value!r} (expected one of {sorted([*real, *fake])})")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise RecipeError(f"{path}: missing {what} folder")
    return path


def first_existing(root: Path, candidates: Iterable[str], what: str) -> Path:
    """The first candidate path (relative to ``root``) that exists; the error lists where we looked."""
    candidates = list(candidates)
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    raise RecipeError(f"{root}: no {what} found (looked for {', '.join(candidates)})")


def present(folder: Path, names: Iterable[str], what: str) -> set[str]:
    """The ``names`` that exist in ``folder`` (absent splits are skipped: partial downloads are common);
    none at all is a layout error."""
    names = list(names)
    found = {name for name in names if (folder / name).exists()}
    if not found:
        raise RecipeError(f"{folder}: no {what} found (looked for {', '.join(names)})")
    return found


def subdirs(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def audio_files(folder: Path, extensions: Iterable[str] = AUDIO_EXTENSIONS, recursive: bool = False) -> list[Path]:
    """Audio files in ``folder`` (sorted); any other visible file is a layout error naming it."""
    extensions = tuple(extensions)
    found, unexpected = [], []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        (found if path.suffix.lower() in extensions else unexpected).append(path)
    if unexpected:
        raise RecipeError(f"{unexpected[0]}: unexpected file in an audio folder (expected {', '.join(extensions)})"
                          + (f"; {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    return found


def read_fields(path: Path, min_fields: int, max_fields: int | None = None,
                sep: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """Yield ``("file:line", fields)`` for every non-blank line, split on ``sep`` (whitespace if None)."""
    if not path.is_file():
        raise RecipeError(f"{path}: protocol file not found")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.rstrip("\n").split(sep)]
            where = f"{path}:{number}"
            if len(fields) < min_fields or (max_fields is not None and len(fields) > max_fields):
                expected = (min_fields if max_fields == min_fields else f"at least {min_fields}" if max_fields is None
                            else f"{min_fields}..{max_fields}")
                raise RecipeError(f"{where}: {len(fields)} fields, expected {expected}: {line.strip()[:200]!r}")
            yield where, fields


def read_csv_records(path: Path, required: Iterable[str], delimiter: str = ",") -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``("file:line", record)`` of a CSV with a header holding the ``required`` columns."""
    if not path.is_file():
        raise RecipeError(f"{path}: metadata file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [column for column in required if column not in header]
        if missing:
            raise RecipeError(f"{path}:1: missing column(s) {missing}; header is {header}")
        reader.fieldnames = header
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record or any(record.get(column) is None for column in required):
                raise RecipeError(f"{where}: wrong number of fields (header has {len(header)})")
            yield where, {key: value.strip() for key, value in record.items()}


def after_first_row(rows: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """Every row but the first: AntiDeepfake's scripts read some header-less protocol files with a
    header (pandas ``header=0``, or a ``DictReader`` plus ``next()``), so their first file never becomes
    a protocol row. Dropping it here keeps the file sets identical to AD's (docs/parity.md)."""
    rows = iter(rows)
    next(rows, None)
    return rows


def check_name(pattern: re.Pattern[str], path: Path) -> re.Match[str]:
    match = pattern.fullmatch(path.name)
    if match is None:
        raise RecipeError(f"{path}: unexpected name (expected {pattern.pattern})")
    return match


# ----------------------------------------------------------------------------------------------
# audio headers and rows


def audio_info(path: Path) -> AudioInfo:
    """Duration, rate, channels and encoding from the file header, checked against the data (nothing is
    decoded); ``AudioError`` when the file cannot be used, ``length_mismatch`` when its header
    understates its data (its Duration would be wrong)."""
    info = audio.probe(path)
    if info.duration_s is None:
        raise audio.AudioError("unreadable", f"{path}: no duration in its header")
    if info.understated:
        raise audio.AudioError("length_mismatch", f"{path}: its header declares {info.duration_s:.2f} s, its data "
                                                  f"holds more; re-encode the file")
    return info


def rooted(path: Path, root: Path) -> str:
    """``$ROOT/<path relative to root>``: the protocol stays valid wherever the corpus is mounted."""
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        raise RecipeError(f"{path}: outside the corpus root {root}") from None
    return f"{ROOT_PLACEHOLDER}/{relative.as_posix()}"


def _row(recipe: Recipe, root: Path, entry: Entry, info: AudioInfo) -> ProtocolRow:
    return ProtocolRow(id=f"{recipe.prefix}-{entry.file_id}", label=entry.label, duration_s=info.duration_s,
                       path=rooted(entry.path, root), sample_rate_hz=info.sample_rate_hz, attack=entry.attack,
                       speaker=entry.speaker, proportion=entry.proportion, audio_channel=str(info.channels),
                       audio_encoding=info.encoding, audio_bit_sample=info.bits_per_sample,
                       language=entry.language)


def build_rows(recipe: Recipe, root: str | Path, *, num_workers: int = 8, skip_missing: bool = False,
               progress: bool = True) -> PrepareResult:
    """Run a recipe on a corpus root: entries -> header reads -> protocol rows (in entry order).

    A missing, unreadable or empty file raises ``RecipeError`` naming it and the protocol line that
    listed it, unless ``skip_missing``: then it is left out and reported in ``PrepareResult.skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(f"{root}: corpus root is not a folder")
    entries = list(recipe.entries(root))
    if not entries:
        raise RecipeError(f"{root}: no audio found for recipe {recipe.name!r} ({recipe.summary})")
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.label not in LABELS:
            raise RecipeError(f"{entry.source or entry.path}: label {entry.label!r} is not real|fake")
        if entry.file_id in seen:
            raise RecipeError(f"{entry.source or entry.path}: duplicate ID {entry.file_id!r} "
                              f"(first from {seen[entry.file_id]})")
        seen[entry.file_id] = entry.source or str(entry.path)

    def probe(entry: Entry) -> AudioInfo | audio.AudioError:
        try:
            info = audio_info(entry.path)
        except audio.AudioError as error:
            return error
        return info if info.duration_s > 0 else audio.AudioError("empty", f"{entry.path}: no samples")

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        infos = list(tqdm(pool.map(probe, entries), total=len(entries), desc=f"{recipe.name} headers",
                          unit="file", disable=not progress))
    result = PrepareResult([], [])
    for entry, info in zip(entries, infos):
        if isinstance(info, AudioInfo):
            result.rows.append(_row(recipe, root, entry, info))
            continue
        detail = info.detail.replace(f"{entry.path}: ", "")
        problem = f"{entry.path}: {info.reason}" + ("" if info.reason == "missing" else f" ({detail})")
        problem += f" (listed at {entry.source})" if entry.source else ""
        if not skip_missing:
            raise RecipeError(problem)
        result.skipped.append(problem)
        result.rejects.append({"path": str(entry.path), "reason": info.reason, "detail": detail,
                               "listed_at": entry.source or None})
    return result
