"""What an epoch reads, in which order, and which window of each file: pure functions of the seed.

Exact resume rests on one rule: nothing here depends on when reading started or on what a worker has
prefetched. The units of an epoch, their split over ranks and workers, the order of every sample and
each file's crop are functions of ``(seed, epoch, world size, roles)`` and of the positions already
consumed, so a resumed run recomputes them and drops what the state says is consumed.

Units of work
    A shard set's *weight* ``w`` is a per-epoch repeat factor: every epoch each of its ``n`` shards
    is read ``floor(w)`` times, and a subset of ``round(frac(w) * n)`` shards, drawn afresh each epoch
    from ``(seed, epoch, set)``, is read once more. Weight 1 reads the set once, 2.5 reads it twice
    plus half of its shards, 0.25 a quarter of its shards. Each read is a *unit*
    ``(set, shard, occurrence)``, named ``"s:i:o"``.

Order and split
    The units of an epoch are shuffled with a generator seeded by ``(seed, epoch)`` (a fixed seed
    would repeat the same order every epoch), then split across ranks and, inside a rank, across
    *roles* (one per DataLoader worker, one when the main process reads), both balanced by seconds
    to read (greedy longest-first, the index holds per-shard seconds).

Sample order (``read_order``)
    A role deals its units round-robin into ``interleave_shards`` lanes; each lane keeps its units in
    order and the lanes are spread evenly over the role's whole stream, so every stretch of the stream
    alternates between that many shards, from the first sample to the last. Every sample then moves
    by a uniform random offset of up to ``shuffle_buffer`` places. A worker reads each tar front to
    back on demand and holds at most about ``shuffle_buffer + interleave_shards`` undelivered samples.
    Unlike a shuffle buffer, whose output depends on when reading started, the order is a pure
    function of the plan.

Positions
    A unit's consumed samples are indexes into its shard's ``keys``, stored as a count ``k``
    (positions ``0..k-1``; a fully read shard is its sample count) or a list of ``[start, stop)`` ranges.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from posttrain.config import CropConfig
from posttrain.data.shard_set import ShardSet


@dataclass(frozen=True, order=True)
class Unit:
    set_index: int
    shard_index: int
    occurrence: int

    @property
    def name(self) -> str:
        return f"{self.set_index}:{self.shard_index}:{self.occurrence}"


def epoch_units(sets: list[ShardSet], weights: list[float], seed: int, epoch: int) -> list[Unit]:
    """All units of an epoch, in the epoch's shuffled order."""
    units = []
    for set_index, (shard_set, weight) in enumerate(zip(sets, weights)):
        whole = math.floor(weight)
        count = len(shard_set.shards)
        units += [Unit(set_index, i, o) for o in range(whole) for i in range(count)]
        extra = round((weight - whole) * count)
        chosen = random.Random(f"{seed}/{epoch}/subset/{set_index}").sample(range(count), extra)
        units += [Unit(set_index, i, whole) for i in sorted(chosen)]
    random.Random(f"{seed}/{epoch}/order").shuffle(units)
    return units


def balance(weights: list[float], num_parts: int) -> list[list[int]]:
    """Indexes of ``weights`` split into ``num_parts`` lists of near-equal total weight (greedy,
    heaviest first, ties to the lowest part); each list keeps the original index order."""
    loads = [0.0] * num_parts
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        part = min(range(num_parts), key=lambda p: (loads[p], p))
        loads[part] += weights[index]
        parts[part].append(index)
    return [sorted(part) for part in parts]


def encode_positions(positions: Iterable[int]) -> int | list[list[int]]:
    """Sorted positions as a count ``k`` (exactly ``0..k-1``) or ``[start, stop)`` ranges."""
    ranges: list[list[int]] = []
    for position in sorted(set(positions)):
        if ranges and ranges[-1][1] == position:
            ranges[-1][1] += 1
        else:
            ranges.append([position, position + 1])
    if not ranges:
        return 0
    if len(ranges) == 1 and ranges[0][0] == 0:
        return ranges[0][1]
    return ranges


def decode_positions(encoded: int | list[list[int]]) -> set[int]:
    if isinstance(encoded, int):
        return set(range(encoded))
    return {p for start, stop in encoded for p in range(start, stop)}


@dataclass(frozen=True)
class UnitTask:
    """What a role reads of one unit: the tar, its keys, the positions the plan gives it (in tar
    order) and the positions already consumed (skipped)."""

    unit: Unit
    path: str
    bytes: int
    keys: tuple[str, ...]
    planned: np.ndarray
    skip: frozenset[int]
    seconds: float  # planned audio seconds, for balancing


def seeded_rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a hash of ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def read_order(unit_sizes: list[int], lanes: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a role hands out its samples, as indexes into the concatenation of its
    units' samples (see "Sample order" above). Every sample gets a place on a line of
    ``sum(unit_sizes)`` places: units are dealt into ``lanes`` lanes, a lane's samples are spaced
    evenly (with a random phase) over the whole line, then each place moves by up to ``window``;
    sorting the places gives the order."""
    sizes = np.asarray(unit_sizes, dtype=np.int64)
    total = int(sizes.sum())
    lanes = max(1, min(lanes, len(sizes)))
    lane_of_unit = np.arange(len(sizes)) % lanes
    start_in_lane = np.zeros(len(sizes), dtype=np.int64)
    lane_sizes = np.zeros(lanes, dtype=np.int64)
    for unit, size in enumerate(sizes):  # a loop over units, not samples
        start_in_lane[unit] = lane_sizes[lane_of_unit[unit]]
        lane_sizes[lane_of_unit[unit]] += size
    unit_of_sample = np.repeat(np.arange(len(sizes)), sizes)
    index_in_unit = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    index_in_lane = start_in_lane[unit_of_sample] + index_in_unit
    spacing = total / lane_sizes[lane_of_unit[unit_of_sample]]
    place = (index_in_lane + rng.random(total)) * spacing + rng.random(total) * window
    return np.argsort(place, kind="stable")


def crop_window(num_samples: int, crop: CropConfig, sample_rate_hz: int,
                make_rng: Callable[[], np.random.Generator]) -> tuple[int, int]:
    """``(start, length)`` of the crop. ``antideepfake``: files longer than ``crop_above_seconds``
    get one crop of uniform random length in [min_seconds, max_seconds] at a uniform random start;
    ``fixed``: files longer than ``fixed_seconds`` get a random window of that length (shorter ones
    stay whole, batches pad them); ``none``: the whole file. ``make_rng`` is called only for a file
    the crop cuts (seeding a generator costs more than decoding a short clip)."""
    if crop.policy == "antideepfake" and num_samples > crop.crop_above_seconds * sample_rate_hz:
        low, high = round(crop.min_seconds * sample_rate_hz), round(crop.max_seconds * sample_rate_hz)
        rng = make_rng()
        length = min(int(rng.integers(low, high + 1)), num_samples)
    elif crop.policy == "fixed" and num_samples > crop.fixed_seconds * sample_rate_hz:
        rng, length = make_rng(), round(crop.fixed_seconds * sample_rate_hz)
    else:
        return 0, num_samples
    return int(rng.integers(0, num_samples - length + 1)), length


def sample_rng(seed: int, epoch: int, unit: Unit, key: str) -> np.random.Generator:
    """Per-sample generator: the same crop on resume, a different one each epoch and repeat."""
    return seeded_rng(seed, epoch, unit.set_index, unit.occurrence, key)
