"""WebDataset shard sets: the on-disk format, reading it back, and verifying it.

A shard directory holds ``<name>-%06d.tar`` files, ``index.json`` and ``rejects.jsonl`` (format in
HELPERS.md / the README). Each sample is ``<key>.flac`` (16 kHz mono, PCM_16) + ``<key>.json``.
Building lives in ``posttrain.data.shard_build``. ``decode_sample`` is the one decoder of a sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import locations
from posttrain.data.labels import LABEL_IDS, LABELS

FORMAT = "posttrain-shards"
VERSION = 1
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
TASK_INDEX_GLOB = "index.task-*-of-*.json"  # the partial index of each task of a split build
SAMPLE_EXTENSIONS = ("flac", "json")  # tar member order within a sample (TarWriter sorts them)
META_FIELDS = ("id", "label", "corpus", "attack", "speaker", "language", "proportion", "duration_s",
               "num_samples", "sample_rate_hz", "orig_sample_rate_hz", "source_path")
TOTAL_GROUPS = {"by_label": "label", "by_corpus": "corpus", "by_language": "language", "by_attack": "attack",
                "by_proportion": "proportion"}
NAMED_SPLITS = ("train", "valid", "test")  # protocol proportions a set can hold ("-" = none assigned)

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ShardFormatError(ValueError):
    """A shard directory that does not hold a readable shard set."""


def sample_key(sample_id: str) -> str:
    """The WebDataset key of a sample id: webdataset splits member names at the first dot."""
    return _KEY_UNSAFE.sub("_", sample_id)


def load_index(directory: str | Path, policy: locations.RetryPolicy = locations.RetryPolicy()) -> dict[str, Any]:
    """Read ``index.json`` of a shard set (a folder, a URL or a ``pipe:`` command, see
    ``posttrain.data.locations``), checking its format and version."""
    if locations.is_local(str(directory)):
        path = locations.local_path(str(directory)) / INDEX_NAME
        if not path.is_file():
            raise ShardFormatError(missing_index_message(locations.local_path(str(directory))))
        text = path.read_bytes()
    else:
        path = locations.join(str(directory), INDEX_NAME)
        try:
            text = locations.read_bytes(path, policy)
        except FileNotFoundError:
            raise ShardFormatError(f"{path}: no shard index there; check the URL (a shard set's location is "
                                   f"the folder that holds {INDEX_NAME})") from None
    try:
        index = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardFormatError(f"{path}: not JSON: {error}") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ShardFormatError(f"{path}: format {index.get('format')!r} version {index.get('version')!r}, "
                               f"expected {FORMAT!r} version {VERSION}")
    return index


def missing_index_message(directory: Path) -> str:
    """What to do about a shard folder without ``index.json``: build it, finish or merge a split build."""
    if not directory.is_dir():
        return (f"{directory}: no such shard folder; build it with `posttrain shards build --protocol CSV "
                f"--root DIR --out {directory}` or fix the path")
    if any(directory.glob(TASK_INDEX_GLOB)):
        return (f"{directory}: the tasks of a split build are not merged yet; run `posttrain shards merge "
                f"{directory}` once every task has finished")
    return (f"{directory}: no {INDEX_NAME} (an unfinished or foreign shard folder); build it with "
            f"`posttrain shards build ... --out {directory}` (a re-run resumes)")


def shard_paths(directory: str | Path, index: dict[str, Any] | None = None) -> list[Path]:
    """Absolute paths of the shards of a directory, in index order."""
    index = load_index(directory) if index is None else index
    return [Path(directory).resolve() / shard["name"] for shard in index["shards"]]


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of one tar, in tar order.

    Members of a sample are consecutive (as WebDataset requires); a key that reappears later is an error.
    """
    seen: set[str] = set()
    key, files = None, {}
    with tarfile.open(path, "r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            member_key, _, extension = member.name.partition(".")
            if member_key != key:
                if key is not None:
                    yield key, files
                if member_key in seen:
                    raise ShardFormatError(f"{path}: key {member_key!r} is split across the tar")
                seen.add(member_key)
                key, files = member_key, {}
            files[extension] = archive.extractfile(member).read()
    if key is not None:
        yield key, files


class SampleError(ValueError):
    """One shard sample that cannot be used. ``reason``: one word (``incomplete``, ``json``, ``audio``);
    ``detail`` names the member at fault (it starts with ``json`` or ``flac``); ``sample_id`` once known."""

    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        self.reason = reason
        self.detail = detail
        self.sample_id = sample_id
        super().__init__(f"{reason}: {detail}")


@dataclass
class SampleMeta:
    id: str
    label: int  # label id (posttrain.data.labels): 1 = real
    meta: dict[str, Any]  # the whole JSON member


@dataclass
class ShardSample(SampleMeta):
    wave: np.ndarray  # float32 mono at SAMPLE_RATE_HZ


@dataclass
class PendingSample(SampleMeta):
    """A shard sample whose JSON is parsed and whose audio is not decoded yet (``decode_audio_into``
    writes it, or a window of it, where it is needed)."""

    flac: bytes
    num_samples: int | None  # as the JSON says; None when it does not


def decode_meta(key: str, data: bytes) -> SampleMeta:
    """A sample's JSON member: its id (the key when the JSON has none) and label id."""
    try:
        meta = json.loads(data)
        return SampleMeta(str(meta.get("id", key)), LABEL_IDS[meta["label"]], meta)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON, UTF-8, a missing or unknown label
        raise SampleError("json", f"json: {error!r}") from None


@contextlib.contextmanager
def _flac_decoding(sample_id: str | None = None) -> Iterator[None]:
    """Any decoder failure is a corrupt sample (soundfile raises RuntimeErrors)."""
    try:
        yield
    except Exception as error:
        raise SampleError("audio", f"flac does not decode: {error!r}", sample_id) from None


def _check_rate(rate: int, sample_rate_hz: int, sample_id: str | None = None) -> None:
    if rate != sample_rate_hz:
        raise SampleError("audio", f"flac at {rate} Hz, expected {sample_rate_hz}", sample_id)


def decode_audio(data: bytes, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """A sample's FLAC member as float32 mono; any other rate than ``sample_rate_hz`` is an error."""
    from posttrain.data.audio import decode_flac  # soundfile only; keeps inspect free of it

    with _flac_decoding():
        samples, rate = decode_flac(data)
    _check_rate(rate, sample_rate_hz)
    return samples


def parse_sample(key: str, files: dict[str, bytes]) -> PendingSample:
    """One shard sample (``{extension: bytes}`` as ``iter_shard`` yields it) -> id, label, metadata and
    its FLAC bytes, undecoded; ``SampleError`` says what is wrong."""
    if "json" not in files or "flac" not in files:
        raise SampleError("incomplete", f"{key} has {sorted(files)}")
    meta = decode_meta(key, files["json"])
    num_samples = meta.meta.get("num_samples")
    return PendingSample(meta.id, meta.label, meta.meta, files["flac"],
                         num_samples if isinstance(num_samples, int) and not isinstance(num_samples, bool) else None)


def decode_sample(key: str, files: dict[str, bytes], sample_rate_hz: int = SAMPLE_RATE_HZ) -> ShardSample:
    """One shard sample -> id, label, metadata and waveform; ``SampleError`` says what is wrong. Every
    reader of shard samples decodes through here or through ``decode_audio_into``."""
    sample = parse_sample(key, files)
    try:
        wave = decode_audio(sample.flac, sample_rate_hz)
    except SampleError as error:
        raise SampleError(error.reason, error.detail, sample.id) from None
    return ShardSample(sample.id, sample.label, sample.meta, wave)


def sample_frames(sample: PendingSample) -> int:
    """The sample's length in samples: its JSON's ``num_samples``, else the FLAC header's."""
    from posttrain.data.audio import flac_frames

    if sample.num_samples is not None:
        return sample.num_samples
    with _flac_decoding(sample.id):
        return flac_frames(sample.flac)


def decode_audio_into(sample: PendingSample, out: np.ndarray, start: int = 0,
                      sample_rate_hz: int = SAMPLE_RATE_HZ) -> None:
    """Samples ``[start, start + len(out))`` of the sample's audio straight into ``out`` (a row of a
    batch: no buffer, no copy). ``SampleError`` as ``decode_audio``, and also when the FLAC does not
    hold the ``num_samples`` its JSON says (the window was cut from that length)."""
    from posttrain.data.audio import decode_flac_into

    with _flac_decoding(sample.id):
        rate, frames = decode_flac_into(sample.flac, out, start)
    _check_rate(rate, sample_rate_hz, sample.id)
    if sample.num_samples is not None and frames != sample.num_samples:
        raise SampleError("audio", f"flac holds {frames} samples, json says {sample.num_samples}", sample.id)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sample(key: str, files: dict[str, bytes]) -> list[str]:
    """Problems of one sample: member set, JSON fields, FLAC decoding and length."""
    if sorted(files) != sorted(SAMPLE_EXTENSIONS):
        return [f"members {sorted(files)}, expected {list(SAMPLE_EXTENSIONS)}"]
    try:
        meta = json.loads(files["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f"json does not parse: {error}"]
    problems = [f"json lacks {field!r}" for field in META_FIELDS if field not in meta]
    if problems:
        return problems
    if sample_key(meta["id"]) != key:
        problems.append(f"json id {meta['id']!r} does not match the key")
    try:
        samples = decode_audio(files["flac"])
    except SampleError as error:
        return problems + [error.detail]
    if len(samples) != meta["num_samples"]:
        problems.append(f"flac has {len(samples)} samples, json says {meta['num_samples']}")
    return problems


def verify_shard(directory: Path, entry: dict[str, Any]) -> list[str]:
    """Re-hash one shard and re-decode all its samples against its index entry."""
    path = directory / entry["name"]
    where = entry["name"]
    if not path.is_file():
        return [f"{where}: missing"]
    problems = []
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{where}: {path.stat().st_size} bytes, index says {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        problems.append(f"{where}: sha256 differs from the index")
    keys, labels, num_samples, lengths = [], {label: 0 for label in LABELS}, 0, []
    try:
        for key, files in iter_shard(path):
            keys.append(key)
            sample_problems = _check_sample(key, files)
            problems += [f"{where} key {key}: {problem}" for problem in sample_problems]
            if not sample_problems:
                meta = json.loads(files["json"])
                labels[meta["label"]] = labels.get(meta["label"], 0) + 1
                num_samples += meta["num_samples"]
                lengths.append(meta["num_samples"])
    except (tarfile.TarError, ShardFormatError, OSError, EOFError) as error:
        return problems + [f"{where}: unreadable tar: {error}"]
    if keys != entry["keys"]:
        missing = sorted(set(entry["keys"]) - set(keys))
        extra = sorted(set(keys) - set(entry["keys"]))
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "same keys, different order"
        problems.append(f"{where}: keys differ from the index: {detail}")
    if len(keys) != entry["samples"] or labels != entry["labels"]:
        problems.append(f"{where}: {len(keys)} samples {labels}, index says {entry['samples']} {entry['labels']}")
    elif abs(num_samples / SAMPLE_RATE_HZ - entry["seconds"]) > 1e-3:
        problems.append(f"{where}: {num_samples / SAMPLE_RATE_HZ:.3f} s of audio, index says {entry['seconds']}")
    elif "num_samples" in entry and entry["num_samples"] != lengths:
        wrong = [key for key, listed, real in zip(keys, entry["num_samples"], lengths) if listed != real]
        problems.append(f"{where}: per-sample durations differ from the index (num_samples) for {wrong[:5]}")
    return problems


def verify_shards(directory: str | Path, *, progress: bool = True) -> list[str]:
    """Every problem of a shard set (empty list = sound): hashes, decoding, keys, counts, rejects."""
    directory = Path(directory)
    index = load_index(directory)
    problems = []
    for entry in tqdm(index["shards"], desc="verify", unit="shard", disable=None if progress else True):
        problems += verify_shard(directory, entry)
    samples = sum(entry["samples"] for entry in index["shards"])
    if samples != index["totals"]["samples"]:
        problems.append(f"{INDEX_NAME}: shards hold {samples} samples, totals say {index['totals']['samples']}")
    rejects_path = directory / REJECTS_NAME
    rejects = len(rejects_path.read_text(encoding="utf-8").splitlines()) if rejects_path.is_file() else 0
    if rejects != index["rejects"]:
        problems.append(f"{REJECTS_NAME}: {rejects} lines, {INDEX_NAME} says {index['rejects']} rejects")
    return problems


def check_shard_set(directory: str | Path, role: str) -> dict[str, Any]:
    """Refuse a shard set that cannot serve as ``role`` (train|valid), before any training starts.

    It must exist and be indexed, hold samples, a validation set must hold both classes, and neither
    may hold protocol rows of another split (test rows in a training set) unless its builder was
    explicitly asked to mix proportions (``--mixed-proportions``; recorded in index.json).
    Returns the index.
    """
    index = load_index(directory)
    totals = index["totals"]
    if totals["samples"] == 0:
        raise ShardFormatError(f"{directory}: the shard set holds no samples ({index['rejects']} rejects)")
    if role == "valid":
        absent = [label for label in ("real", "fake") if totals["by_label"].get(label, {}).get("samples", 0) == 0]
        if absent:
            raise ShardFormatError(f"{directory}: the validation set has no {absent[0]} samples "
                                   f"(the EER needs both classes); rebuild it from rows of both labels")
    foreign = {proportion: item["samples"] for proportion, item in totals.get("by_proportion", {}).items()
               if proportion in NAMED_SPLITS and proportion != role and item["samples"]}
    if foreign and not index.get("mixed_proportions", False):
        counts = ", ".join(f"{count} {proportion}" for proportion, count in sorted(foreign.items()))
        raise ShardFormatError(f"{directory}: a {role} set holding protocol rows of another split ({counts}); "
                               f"rebuild it with `posttrain shards build --split {role}`")
    return index


def format_index(index: dict[str, Any], directory: str | Path | None = None) -> str:
    """The index as text tables: one line per shard, then totals per group."""
    lines = [f"{'shard':<24} {'samples':>8} {'hours':>8} {'real':>7} {'fake':>7} {'MB':>9}  sha256"]
    for shard in index["shards"]:
        lines.append(f"{shard['name']:<24} {shard['samples']:>8} {shard['seconds'] / 3600:>8.3f} "
                     f"{shard['labels']['real']:>7} {shard['labels']['fake']:>7} {shard['bytes'] / 1e6:>9.2f}"
                     f"  {shard['sha256'][:12]}")
    totals = index["totals"]
    lines.append(f"{'total':<24} {totals['samples']:>8} {totals['seconds'] / 3600:>8.3f}   "
                 f"({len(index['shards'])} shards, {index['rejects']} rejects, seed {index['seed']})")
    for group in TOTAL_GROUPS:
        if group not in totals:  # a set indexed before the group existed
            continue
        lines.append(f"\n{group[3:]:<24} {'samples':>8} {'hours':>8}")
        for value, count in sorted(totals[group].items()):
            lines.append(f"{value:<24} {count['samples']:>8} {count['seconds'] / 3600:>8.3f}")
    if index["rejects"]:
        lines.append("\n" + format_rejects(index, directory))
    return "\n".join(lines)


def format_rejects(index: dict[str, Any], directory: str | Path | None = None, top: int = 5) -> str:
    """One line: how many rows were rejected, where they are listed, and the most frequent reasons."""
    reasons = index.get("rejects_by_reason", {})
    shown = ", ".join(f"{reason} {count}" for reason, count in list(reasons.items())[:top])
    more = f", {len(reasons) - top} more reasons" if len(reasons) > top else ""
    return (f"rejected {index['rejects']} rows ({shown}{more}): one JSON line each, with the decoder's "
            f"message, in {Path(directory) / REJECTS_NAME if directory is not None else REJECTS_NAME}")

