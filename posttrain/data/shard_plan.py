"""The plan of a shard set: which protocol rows, in which shards, split into which tasks.

It depends only on the protocol CSVs and the options (never on the task split, worker count or machine):
rows are sorted by ID, shuffled with the seed (so every shard mixes corpora, languages and labels), and cut
into contiguous shards bounded by a sample count and by a byte bound derived from the CSV durations; task
i of n builds a contiguous range of them (``posttrain.data.shard_build``).
"""

from __future__ import annotations

import logging
import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data.protocol import PROPORTIONS, ProtocolRow
from posttrain.data.shards import sample_key
from posttrain.errors import UserError

log = logging.getLogger(__name__)

MEGABYTE = 1_000_000
# Decoded audio may differ from the CSV duration by this ratio plus ``duration_tolerance_s`` before the
# row is a ``duration_mismatch`` reject; the byte bound of the plan relies on the upper side
# (``%.6g`` durations and resampling round by far less; lossy codecs pad up to ~50 ms).
DURATION_SLACK_RATIO = 1.001
DEFAULT_DURATION_TOLERANCE_S = 0.05
# FLAC never exceeds 16-bit PCM by more than its frame headers (<0.2 % measured on white noise) plus
# ~100 bytes of stream header; a tar member adds a 512-byte header and up to 511 bytes of padding.
FLAC_RATIO = 1.002
FLAC_HEADER_BYTES = 1024
TAR_MEMBER_BYTES = 1023 + 512
TAR_END_BYTES = 10240 + 1024  # end-of-archive blocks, padded to tarfile's 10 KiB record


class ShardBuildError(UserError, RuntimeError):
    """A build that cannot proceed (strict reject, mixed plans, incomplete merge): the user's to fix."""


# The named splits a shard set can be built for (``Proportion`` values; "-" = no assigned split).
SPLITS = ("train", "valid", "test")
MIXED = "mixed"  # the split label of a set that keeps several proportions because the user asked


@dataclass(frozen=True)
class BuildOptions:
    """``split`` keeps the protocol rows whose ``Proportion`` is that split; ``proportions`` instead keeps
    an explicit set of them (``--mixed-proportions``, a mix's declared splits). With neither, rows of
    more than one proportion are refused: test rows must never reach a training set unasked."""

    name: str | None = None  # shard file prefix; None = the split (or the single proportion found)
    split: str | None = None
    proportions: tuple[str, ...] | None = None
    max_samples_per_shard: int = 1000
    max_shard_mb: float = 1000.0  # MB = 10^6 bytes
    seed: int = 0
    min_seconds: float = 0.1
    duration_tolerance_s: float = DEFAULT_DURATION_TOLERANCE_S
    num_workers: int = 1
    strict: bool = False
    task_index: int = 0
    num_tasks: int = 1
    progress: bool = True

    @property
    def prefix(self) -> str:
        """The shard file prefix: ``name``, else the split, else ``shards``."""
        return self.name or self.split or "shards"

    def __post_init__(self) -> None:
        checks = {"max_samples_per_shard": self.max_samples_per_shard >= 1, "max_shard_mb": self.max_shard_mb > 0,
                  "min_seconds": self.min_seconds >= 0, "num_workers": self.num_workers >= 1,
                  "duration_tolerance_s": self.duration_tolerance_s >= 0,
                  "num_tasks": self.num_tasks >= 1, "task_index": 0 <= self.task_index < self.num_tasks,
                  "name": self.name is None or (bool(self.name) and sample_key(self.name) == self.name),
                  "split": self.split is None or self.split in SPLITS,
                  "proportions": self.proportions is None or (bool(self.proportions) and
                                                              set(self.proportions) <= set(PROPORTIONS))}
        for option, ok in checks.items():
            if not ok:
                raise ValueError(f"shard build option {option}={getattr(self, option)!r} is out of range")


@dataclass(frozen=True)
class ShardSpec:
    """One planned shard: its position, file name and rows in write order."""

    index: int
    name: str
    rows: tuple[ProtocolRow, ...]


def _count_text(counts: Counter) -> str:
    return ", ".join(f"{proportion} {counts[proportion]}" for proportion in PROPORTIONS if counts[proportion])


def select_rows(rows: list[ProtocolRow], options: BuildOptions, where: str) -> tuple[list[ProtocolRow], str | None]:
    """The rows this build keeps by ``Proportion``, and the set's split label (index.json ``split``):
    the chosen split, the one proportion found, ``mixed`` when asked for several, else None.

    Raises ``ShardBuildError`` counting rows per proportion when the protocol mixes proportions and
    the user did not ask for them (neither ``split`` nor ``proportions``), or when nothing is left.
    """
    counts = Counter(row.proportion for row in rows)
    if options.split is not None or options.proportions is not None:
        keep = set(options.proportions or (options.split,))
        kept = [row for row in rows if row.proportion in keep]
        if not kept:
            asked = f"--split {options.split}" if options.proportions is None else f"proportions {sorted(keep)}"
            raise ShardBuildError(f"{where}: no row has {asked}; its rows by Proportion: {_count_text(counts)}")
        left_out = counts - Counter(row.proportion for row in kept)
        if left_out:
            log.warning("%s: kept %d rows (%s); left out %s", where, len(kept), ", ".join(sorted(keep)),
                        _count_text(left_out))
    elif len(counts) > 1:
        raise ShardBuildError(
            f"{where}: rows of several proportions ({_count_text(counts)}): build one shard set per split with "
            f"--split train|valid|test, or pass --mixed-proportions to keep them all in one set")
    else:
        kept = rows
    found = {row.proportion for row in kept}
    single = next(iter(found)) if len(found) == 1 else None
    return kept, options.split or (single if single in SPLITS else MIXED if len(found) > 1 else None)


def asked_mixed(options: BuildOptions) -> bool:
    """Whether the user asked for rows of several named splits in one set (recorded in index.json)."""
    return options.proportions is not None and len(set(options.proportions) & set(SPLITS)) > 1


def seconds_range(row: ProtocolRow, tolerance_s: float = DEFAULT_DURATION_TOLERANCE_S) -> tuple[float, float]:
    """The shortest and longest decoded audio accepted for a row (the plan's byte bound assumes the latter)."""
    return (row.duration_s / DURATION_SLACK_RATIO - tolerance_s, row.duration_s * DURATION_SLACK_RATIO + tolerance_s)


def sample_meta(row: ProtocolRow, num_samples: int, orig_sample_rate_hz: int) -> dict[str, Any]:
    return {"id": row.id, "label": row.label, "corpus": row.corpus, "attack": row.attack, "speaker": row.speaker,
            "language": row.language, "proportion": row.proportion,
            "duration_s": round(num_samples / SAMPLE_RATE_HZ, 6), "num_samples": num_samples,
            "sample_rate_hz": SAMPLE_RATE_HZ, "orig_sample_rate_hz": orig_sample_rate_hz, "source_path": row.path}


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def row_bytes_bound(row: ProtocolRow, tolerance_s: float = DEFAULT_DURATION_TOLERANCE_S) -> int:
    """An upper bound on the tar bytes a row adds (16-bit PCM bounds FLAC at 16 kHz mono)."""
    num_samples = math.ceil(seconds_range(row, tolerance_s)[1] * SAMPLE_RATE_HZ)
    widest_meta = _meta_bytes(sample_meta(row, 10**12, 10**9))
    return (math.ceil(2 * num_samples * FLAC_RATIO) + FLAC_HEADER_BYTES + len(widest_meta)
            + 2 * TAR_MEMBER_BYTES)


def plan_shards(rows: list[ProtocolRow], options: BuildOptions) -> list[ShardSpec]:
    """The deterministic shard plan: seeded global shuffle, then contiguous bounded chunks."""
    by_key: dict[str, str] = {}
    for row in rows:
        other = by_key.setdefault(sample_key(row.id), row.id)
        if other != row.id:
            raise ShardBuildError(f"IDs {other!r} and {row.id!r} map to the same shard key {sample_key(row.id)!r}")
    ordered = sorted(rows, key=lambda row: row.id)  # CSV order and argument order must not matter
    ordered = [ordered[i] for i in np.random.default_rng(options.seed).permutation(len(ordered))]
    budget = int(options.max_shard_mb * MEGABYTE) - TAR_END_BYTES
    chunks: list[list[ProtocolRow]] = []
    used = budget + 1
    for row in ordered:
        size = row_bytes_bound(row, options.duration_tolerance_s)
        if size > budget:
            log.warning("%s: up to %.1f MB alone exceeds --max-shard-mb %g; it gets a shard of its own",
                        row.id, size / MEGABYTE, options.max_shard_mb)
        if not chunks or len(chunks[-1]) >= options.max_samples_per_shard or used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(row)
        used += size
    return [ShardSpec(i, f"{options.prefix}-{i:06d}.tar", tuple(chunk)) for i, chunk in enumerate(chunks)]


def plan_fingerprint(specs: list[ShardSpec], options: BuildOptions) -> str:
    """Identifies what a shard set holds; parts of different plans never mix in one directory."""
    content = {"name": options.prefix, "split": options.split, "proportions": options.proportions,
               "seed": options.seed, "min_seconds": options.min_seconds,
               "duration_tolerance_s": options.duration_tolerance_s,
               "shards": [[asdict(row) for row in spec.rows] for spec in specs]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def task_shards(specs: list[ShardSpec], task_index: int, num_tasks: int) -> list[ShardSpec]:
    """Task ``task_index`` of ``num_tasks`` builds this contiguous slice of the plan."""
    return specs[task_index * len(specs) // num_tasks:(task_index + 1) * len(specs) // num_tasks]
