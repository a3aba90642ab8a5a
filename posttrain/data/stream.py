"""Epoch-based streaming of WebDataset shard sets with an exactly-once, resumable state.

Units of work
    A shard set is a directory with ``index.json`` (see ``posttrain.data.shards``). Its *weight* ``w``
    is a per-epoch repeat factor: every epoch each of its ``n`` shards is read ``floor(w)`` times, and
    a subset of ``round(frac(w) * n)`` shards, drawn afresh each epoch from ``(seed, epoch, set)``, is
    read once more. Weight 1 reads the set once, 2.5 reads it twice plus half of its shards, 0.25 a
    quarter of its shards. Each read is a *unit* ``(set, shard, occurrence)``, named ``"s:i:o"``.

Order and split
    The units of an epoch are shuffled with a generator seeded by ``(seed, epoch)`` (a fixed seed
    would repeat the same order every epoch), then split across ranks and, inside a rank, across
    *roles* (one per DataLoader worker, one when the main process reads), both balanced by seconds
    to read (greedy longest-first, the index holds per-shard seconds). This assignment is the
    epoch's *plan*: a function of ``(seed, epoch, world size, roles)`` and of the positions already
    consumed when it was made (its ``base``, empty unless a resume changed the world size or the
    worker count, which re-balances the remaining work).

Sample order (``read_order``)
    A role deals its units round-robin into ``interleave_shards`` lanes; each lane keeps its units in
    order and the lanes are spread evenly over the role's whole stream, so every stretch of the stream
    alternates between that many shards, from the first sample to the last. Every sample then moves
    by a uniform random offset of up to ``shuffle_buffer`` places. A worker reads each tar front to
    back on demand and holds at most about ``shuffle_buffer + interleave_shards`` undelivered samples
    (as FLAC bytes). Unlike a shuffle buffer, whose output depends on when reading started, the order
    is a pure function of the plan: a resumed role recomputes it and drops the consumed samples.
    Samples are then grouped by ``posttrain.data.batching`` into batches of bounded padded seconds,
    with the *bucket plan* of ``bucket_policy`` (``fitted``: edges fitted to the per-sample durations
    of the indexes, after the crop, weighted by the mix). The bucket plan is derived once from the
    indexes and saved in the plan of the state, so a resumed epoch batches with the same buckets.

Decoding into the batch
    A sample is batched on its length (its JSON's ``num_samples``, else its FLAC header's) with its
    crop drawn, and held as FLAC bytes until its batch is complete; then each sample's window is
    decoded straight into its row (``decode_audio_into``: no buffer per sample, no collation copy,
    only the FLAC frames around a crop are decoded). A sample that fails there (garbage audio, a
    length other than its JSON says) is counted corrupt and the next sample takes its row. Workers
    fill shared-memory buffers that they reuse once the main process holds no tensor of the batch in
    them any more (``BatchSlots``), so a batch reaches the main process without a copy, a fresh page
    or a descriptor passed per batch.

Exactly once and exact resume
    The state holds ``{epoch, seed, consumed: {unit: positions}, plan, cursors}`` where positions are
    indexes into the shard's ``keys`` list, stored as a count ``k`` (positions ``0..k-1``; a fully
    read shard is its sample count) or a list of ``[start, stop)`` ranges. Consumption is recorded
    in the main process when a batch is handed out, never when a worker prefetches. Corrupt or
    missing samples are recorded as consumed too (and counted), so a resume neither retries nor
    loses them. The main process takes the roles' batches in turn (round-robin; a finished role
    leaves the turn) and ``cursors`` keeps each rank's next role. A role's consumed batches are a
    prefix of its batch sequence and the batcher restarts identically on what remains (see
    ``batch_by_seconds``), so a resume at the same world size and worker count hands out exactly
    the batches of an uninterrupted run, in the same order. Otherwise the remaining work is
    re-planned: every sample is still read exactly once. ``global_state_dict()`` merges the states
    of all ranks (one ``all_gather_object``).

Equal batch counts
    When a process group is initialised and ``world_size > 1``, each batch costs one ``all_reduce``
    of three ints (SUM of "I still have data", samples, audio samples; the counts ride along to the
    train step as ``Batch.global_counts``): a latency-bound collective of a few bytes, tens of
    microseconds on NVLink/InfiniBand and well under a millisecond with gloo, negligible next to a
    training step. A rank out of data yields join batches (``Batch.empty()``) until every rank is
    done, so collectives never hang; the trainer multiplies a join batch's loss by zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from posttrain.config import CropConfig, StreamConfig
from posttrain.data import locations
from posttrain.data.batch import Batch
from posttrain.data.batching import (BucketPlan, PaddingMeter, antideepfake_plan, batch_by_seconds, bucket_edges,
                                     fitted_edges)
from posttrain.data.locations import RetryPolicy, ShardReadError, open_shard
from posttrain.data.shards import (INDEX_NAME, PendingSample, SampleError, ShardFormatError, decode_audio_into,
                                   load_index, parse_sample, sample_frames, shard_paths)
from posttrain.dist import all_gather_objects, collective_device, dist_info, global_sums, is_initialized, world_group

log = logging.getLogger(__name__)

STATE_FORMAT = "posttrain-stream"
STATE_VERSION = 3  # v1 states (no plan) load re-planned; v2 plans (no bucket plan) had uniform edges

# Batches a worker may have out at once before it falls back to fresh buffers: the DataLoader's
# prefetch (2), the main process's round-robin queue and the batches a train step holds.
BATCH_SLOTS_PER_WORKER = 8

# ------------------------------------------------------------------------------------------ shard sets


def retry_policy(cfg: StreamConfig) -> RetryPolicy:
    return RetryPolicy(cfg.read_attempts, cfg.read_backoff_seconds, timeout_seconds=cfg.read_timeout_seconds)


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int
    seconds: float
    keys: tuple[str, ...]
    num_samples: tuple[int, ...] | None  # audio samples per key; None in an index built before they were listed
    bytes: int  # of the tar: a network stream that ends before it broke and is resumed


@dataclass(frozen=True)
class ShardSet:
    directory: str
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def durations_seconds(self, sample_rate_hz: int) -> np.ndarray | None:
        """Every sample's duration, or None when the index does not list them."""
        if any(shard.num_samples is None for shard in self.shards):
            return None
        lengths = [np.asarray(shard.num_samples, dtype=np.float64) for shard in self.shards]
        return np.concatenate(lengths) / sample_rate_hz if lengths else np.zeros(0)

    @staticmethod
    def load(directory: str | Path, policy: RetryPolicy = RetryPolicy()) -> "ShardSet":
        """Read ``index.json`` (of a folder, a URL or a ``pipe:`` command, see
        ``posttrain.data.locations``); a missing local tar or an index that disagrees with itself
        raises ``ShardFormatError`` naming the file."""
        index = load_index(directory, policy)
        index_path = locations.join(str(directory), INDEX_NAME)
        local = locations.is_local(str(directory))
        paths = shard_paths(locations.local_path(str(directory)), index) if local else [
            locations.join(str(directory), entry["name"]) for entry in index["shards"]]
        shards = []
        for row, (entry, path) in enumerate(zip(index["shards"], paths)):
            if local and not path.is_file():
                raise ShardFormatError(f"{index_path}: shards[{row}] {path} does not exist")
            if len(entry["keys"]) != entry["samples"]:
                raise ShardFormatError(f"{index_path}: shards[{row}] lists {len(entry['keys'])} keys "
                                       f"for {entry['samples']} samples")
            num_samples = entry.get("num_samples")
            if num_samples is not None and len(num_samples) != entry["samples"]:
                raise ShardFormatError(f"{index_path}: shards[{row}] lists {len(num_samples)} durations "
                                       f"for {entry['samples']} samples")
            shards.append(ShardInfo(str(path), int(entry["samples"]), float(entry["seconds"]),
                                    tuple(entry["keys"]), None if num_samples is None else tuple(num_samples),
                                    int(entry["bytes"])))
        return ShardSet(str(directory), tuple(shards))


# ------------------------------------------------------------------------------------- units and plans


@dataclass(frozen=True, order=True)
class Unit:
    set_index: int
    shard_index: int
    occurrence: int

    @property
    def name(self) -> str:
        return f"{self.set_index}:{self.shard_index}:{self.occurrence}"


def epoch_units(sets: list[ShardSet], weights: list[float], seed: int, epoch: int) -> list[Unit]:
    """All units of an epoch, in the epoch's shuffled order (see the module docstring)."""
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
    units' samples (see "Sample order" in the module docstring). Every sample gets a place on a
    line of ``sum(unit_sizes)`` places: units are dealt into ``lanes`` lanes, a lane's samples are
    spaced evenly (with a random phase) over the whole line, then each place moves by up to
    ``window``; sorting the places gives the order."""
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


# --------------------------------------------------------------------------------------- per sample


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


def delivered_lengths(seconds: np.ndarray, crop: CropConfig, spread: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, weights)``: the distribution of what ``crop_window`` makes of files of these
    durations. A file kept whole is itself (weight 1); the ``antideepfake`` crop's uniform random
    length is ``spread`` evenly spaced lengths over [min_seconds, max_seconds] sharing the cropped
    files' weight; the ``fixed`` crop is ``fixed_seconds``."""
    if crop.policy == "antideepfake":
        cut = seconds > crop.crop_above_seconds
        spread_lengths = crop.min_seconds + (crop.max_seconds - crop.min_seconds) * (np.arange(spread) + 0.5) / spread
        return (np.concatenate([seconds[~cut], spread_lengths]),
                np.concatenate([np.ones(int((~cut).sum())), np.full(spread, cut.sum() / spread)]))
    if crop.policy == "fixed":
        seconds = np.minimum(seconds, crop.fixed_seconds)
    return seconds, np.ones(seconds.size)


def longest_delivered_seconds(cfg: StreamConfig) -> float:
    """The longest sample the crop policy delivers (``none``: the batch budget, beyond which a sample
    is a batch of its own)."""
    crop = cfg.crop
    return {"antideepfake": max(crop.crop_above_seconds, crop.max_seconds), "fixed": crop.fixed_seconds,
            "none": cfg.max_batch_seconds}[crop.policy]


def bucket_plan(cfg: StreamConfig, sets: list[ShardSet], weights: list[float]) -> BucketPlan:
    """The bucket plan of ``cfg.bucket_policy`` (see ``posttrain.data.batching``). ``fitted`` needs the
    per-sample durations of every index; an index without them gets uniform edges and a warning."""
    if cfg.bucket_policy == "antideepfake":
        return antideepfake_plan(cfg.num_buckets, cfg.max_batch_seconds, cfg.max_batch_size)
    if cfg.bucket_policy == "fitted":
        durations = [shard_set.durations_seconds(cfg.sample_rate_hz) for shard_set in sets]
        if all(d is not None for d in durations) and sum(d.size for d in durations):
            parts = [delivered_lengths(d, cfg.crop) for d in durations]
            lengths = np.concatenate([part[0] for part in parts])
            mix = np.concatenate([part[1] * weight for part, weight in zip(parts, weights)])
            return BucketPlan(tuple(fitted_edges(lengths, mix, cfg.num_buckets)))
        old = [shard_set.directory for shard_set, d in zip(sets, durations) if d is None]
        warnings.warn(f"{', '.join(old)}: index.json lists no per-sample durations (built by an older "
                      f"posttrain); bucket edges fall back to uniform. Rebuild the shard set for fitted edges "
                      f"(lower padding) or set bucket_policy: uniform to silence this.", stacklevel=2)
    return BucketPlan(tuple(bucket_edges(cfg.num_buckets, longest_delivered_seconds(cfg))))


def sample_rng(seed: int, epoch: int, unit: Unit, key: str) -> np.random.Generator:
    """Per-sample generator: the same crop on resume, a different one each epoch and repeat."""
    return seeded_rng(seed, epoch, unit.set_index, unit.occurrence, key)


@dataclass
class Decoded:
    """A sample ready to batch: parsed, its crop drawn; its audio is decoded when its batch is filled."""

    unit: str
    position: int
    sample: PendingSample
    start: int  # the crop's first sample in the file
    length: int  # samples delivered
    source_seconds: float
    repeat: int  # the unit's occurrence: which read of the shard this epoch


@dataclass
class Corrupt:
    unit: str
    position: int
    reason: str


# ---------------------------------------------------------------------------------------- worker side


@dataclass
class Delivery:
    """What a role hands to the main process: a batch, or None as its last delivery, and the
    positions it settles."""

    role: int
    batch: Batch | PackedBatch | None  # packed between a worker and the main process
    consumed: list[tuple[str, int]]
    corrupt: list[Corrupt]
    source_seconds: float


def rows_view(storage: torch.UntypedStorage, shape: tuple[int, int], row_stride: int) -> torch.Tensor:
    """A float32 ``shape`` tensor over ``storage`` from its start, rows ``row_stride`` floats apart."""
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape, (row_stride, 1))


def shared_tensor(rows: int, width: int, storage: torch.UntypedStorage | None = None) -> torch.Tensor:
    """A ``[rows, width]`` float32 tensor in shared memory (a new zeroed one, or a view of ``storage``).
    A worker fills a batch into it, so sending it to the main process passes a file descriptor instead
    of copying the batch into shared memory first."""
    storage = torch.UntypedStorage._new_shared(rows * width * 4) if storage is None else storage
    return rows_view(storage, (rows, width), width)


@dataclass
class PackedBatch:
    """A batch on its way from a worker to the main process. The waveforms are in a ``BatchSlots``
    slot (``slot``; ``storage`` is the slot's shared storage while the main process has not mapped it
    yet, else None) or, with ``slot`` None, in a fresh shared ``storage`` of their own; the rest goes
    by value (torch would put every small tensor in a shared-memory file of its own)."""

    slot: int | None
    storage: torch.UntypedStorage | None
    shape: tuple[int, int]
    row_stride: int  # wider than the shape when corrupt samples left the buffer's longest row empty
    lengths: list[int]
    labels: list[int]
    ids: list[str]
    meta: list[dict[str, Any]]
    repeats: list[int]


class BatchSlots:
    """Shared-memory batch buffers that the workers reuse, and the hand-over of batches through them.

    A fresh shared buffer per batch costs the worker a page fault and the zeroing of every page it
    writes (0.12 CPU-s per audio-hour at 16 kHz, a tenth of decoding it), and torch passes its file
    descriptor over a socket with an authentication handshake, one connection per tensor. A slot is
    allocated once, its descriptor passed once (the main process keeps it and maps the slot afresh
    for every batch), and later batches in it travel as ``(slot, shape)``.

    Each worker owns ``per_worker`` slots of ``slot_floats`` floats. A slot is ``SENT`` from the
    moment a worker collates into it until the main process sees that no tensor refers to the batch
    it received in it any more (a weak reference to that mapping's storage has expired: views, numpy
    arrays and batches kept by the consumer all keep it alive); the main process then marks it
    ``FREE``. So a slot is never written while anything can still read it. A worker that finds no
    free slot, or a batch larger than a slot, collates into a fresh buffer as before: it never waits.
    A batch the DataLoader drops (an abandoned iteration) leaves its slot ``SENT``: the pool shrinks,
    nothing is overwritten."""

    UNUSED, SENT, FREE = 0, 1, 2

    def __init__(self, num_workers: int, per_worker: int, slot_floats: int, context: Any):
        self.per_worker, self.slot_floats = per_worker, slot_floats
        self.states = context.RawArray("b", num_workers * per_worker)  # shared by the workers and main
        self._storages: dict[int, torch.UntypedStorage] = {}  # worker side: its own slots
        self._announced: set[int] = set()  # worker side: slots whose storage went out with a batch
        self._fds: dict[int, int] = {}  # main side: a descriptor of each slot it has seen
        self._received: list[tuple[int, Any]] = []  # main side: (slot, weak reference to a mapping)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker starts with no storages of its own
        return dict(self.__dict__, _storages={}, _announced=set(), _fds={}, _received=[])

    # -- worker side
    def buffer(self, worker: int, rows: int, width: int) -> tuple[torch.Tensor, int | None]:
        """A shared ``[rows, width]`` tensor to fill a batch into, and its slot (None: a fresh buffer)."""
        if rows * width <= self.slot_floats:
            mine = range(worker * self.per_worker, (worker + 1) * self.per_worker)
            slot = next((i for i in mine if self.states[i] == self.FREE), None)
            slot = slot if slot is not None else next((i for i in mine if self.states[i] == self.UNUSED), None)
            if slot is not None:
                if slot not in self._storages:
                    self._storages[slot] = torch.UntypedStorage._new_shared(self.slot_floats * 4)
                self.states[slot] = self.SENT
                return shared_tensor(rows, width, self._storages[slot]), slot
        return shared_tensor(rows, width), None

    def unused(self, slot: int | None) -> None:
        """A buffer that was not sent after all (every sample in it was corrupt)."""
        if slot is not None:
            self.states[slot] = self.FREE

    def pack(self, batch: Batch, slot: int | None) -> PackedBatch:
        """The storage goes with a slot's first batch only: a slot comes back ``FREE`` only after the
        main process received a batch in it, so a first batch the DataLoader dropped leaves its slot
        ``SENT`` for good, and a slot sent again is one whose descriptor the main process holds."""
        if slot is None:
            storage = batch.waveforms.untyped_storage()
        else:
            storage = None if slot in self._announced else self._storages[slot]
            self._announced.add(slot)
        waveforms = batch.waveforms
        return PackedBatch(slot, storage, tuple(waveforms.shape), waveforms.stride(0), batch.lengths.tolist(),
                           batch.labels.tolist(), batch.ids, batch.meta, batch.repeats)

    # -- main side
    def unpack(self, packed: PackedBatch) -> Batch:
        storage = packed.storage
        if packed.slot is not None:
            if storage is not None:
                self._fds[packed.slot] = os.dup(storage._share_fd_cpu_()[0])
            storage = torch.UntypedStorage._new_shared_fd_cpu(self._fds[packed.slot], self.slot_floats * 4)
            self._received.append((packed.slot, StorageWeakRef(storage)))
        waveforms = rows_view(storage, packed.shape, packed.row_stride)
        return Batch(waveforms, torch.tensor(packed.lengths, dtype=torch.long),
                     torch.tensor(packed.labels, dtype=torch.long), packed.ids, packed.meta, packed.repeats)

    def release_unreferenced(self) -> None:
        """Hand back to their workers the slots whose batches nothing refers to any more."""
        held = []
        for slot, storage in self._received:
            if storage.expired():
                self.states[slot] = self.FREE
            else:
                held.append((slot, storage))
        self._received = held

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class TarErrors:
    """A webdataset exception handler that counts instead of sleeping (``warn_and_continue`` sleeps
    0.5 s per error); samples a tar error loses are later accounted as ``missing``. A shard that
    could not be read after every retry stops the loader instead: its samples are not corrupt, and
    a resumed job will read them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: Exception) -> bool:
        if isinstance(error, ShardReadError):
            raise error
        self.count += 1
        return True


class UnitReader:
    """Reads one unit's tar front to back with webdataset, on demand: ``take(position)`` returns that
    member's files, holding the members read before it. Consumed members are never loaded."""

    def __init__(self, task: UnitTask, policy: RetryPolicy):
        self.task = task
        self.position_of = {key: i for i, key in enumerate(task.keys)}
        skip_keys = {task.keys[i] for i in task.skip}
        self.stream = open_shard(task.path, task.bytes, policy)
        handler = TarErrors()
        files = tar_file_expander([{"url": task.path, "stream": self.stream}], handler=handler,
                                  select_files=lambda fname: fname.split(".", 1)[0] not in skip_keys)
        self.samples = group_by_keys(files, handler=handler)
        self.held: dict[int, dict[str, Any]] = {}

    def take(self, position: int) -> dict[str, Any] | None:
        """The member at ``position``, or None when the tar does not hold it (missing)."""
        while position not in self.held:
            sample = next(self.samples, None)
            if sample is None:
                return None
            key = sample["__key__"]
            if key not in self.position_of:
                raise ValueError(f"{self.task.path}: member {key!r} is not listed in the shard index")
            self.held[self.position_of[key]] = sample
        return self.held.pop(position)

    def close(self) -> None:
        self.samples.close()
        self.stream.close()


@dataclass(frozen=True)
class Assignment:
    """What one role reads in one epoch: its units, and what its order, crops and batches depend on."""

    epoch: int
    role: int
    num_roles: int
    tasks: list[UnitTask]
    buckets: BucketPlan


class EpochReader(IterableDataset):
    """One rank's reader. The main process (no workers) reads an assignment with ``deliveries``; a
    DataLoader worker ``r`` (started once per stream and kept across epochs) begins each iteration by
    taking its next assignment from ``queues[r]``, where the main process puts one just before it
    starts the iteration."""

    def __init__(self, cfg: StreamConfig, rank: int, world_size: int, queues: list[Any]):
        super().__init__()
        self.cfg, self.rank, self.world_size, self.queues = cfg, rank, world_size, queues
        self.policy = retry_policy(cfg)
        self.batch_slots: BatchSlots | None = None  # set by the stream before its workers start

    def __iter__(self) -> Iterator[Delivery]:
        return self.deliveries(self.queues[get_worker_info().id].get())

    def deliveries(self, assignment: Assignment) -> Iterator[Delivery]:
        return self._batch(assignment, self._read(assignment, self._slots(assignment)))

    def _slots(self, assignment: Assignment) -> list[tuple[int, int]]:
        """``(task index, position)`` of the role's unconsumed samples in the plan's order."""
        tasks = assignment.tasks
        if not tasks:
            return []
        rng = seeded_rng(self.cfg.seed, assignment.epoch, self.world_size, assignment.num_roles, self.rank,
                         assignment.role, "order")
        window = self.cfg.shuffle_buffer if self.cfg.shuffle_buffer > 1 else 0
        sizes = [len(task.planned) for task in tasks]
        order = read_order(sizes, self.cfg.interleave_shards, window, rng)
        task_of = np.repeat(np.arange(len(tasks)), sizes)
        positions = np.concatenate([task.planned for task in tasks])
        consumed = np.concatenate([np.isin(task.planned, list(task.skip)) for task in tasks])
        order = order[~consumed[order]]
        return list(zip(task_of[order].tolist(), positions[order].tolist()))

    def _read(self, assignment: Assignment, slots: list[tuple[int, int]]) -> Iterator[Decoded | Corrupt]:
        tasks = assignment.tasks
        left = Counter(index for index, _ in slots)
        readers: dict[int, UnitReader] = {}
        for index, position in slots:
            reader = readers.get(index) or readers.setdefault(index, UnitReader(tasks[index], self.policy))
            sample = reader.take(position)
            left[index] -= 1
            if not left[index]:  # close each tar as soon as its last sample is out
                readers.pop(index).close()
            unit = tasks[index].unit
            if sample is None:
                yield Corrupt(unit.name, position, "missing")
                continue
            try:
                yield self._decode(assignment.epoch, unit, position, sample)
            except SampleError as error:
                yield Corrupt(unit.name, position, error.reason)

    def _decode(self, epoch: int, unit: Unit, position: int, files: dict[str, Any]) -> Decoded:
        """Parse a sample and draw its crop from its length (its JSON's, else its FLAC header's); the
        audio waits, as FLAC bytes, to be decoded into its row of a batch."""
        sample = parse_sample(files["__key__"], files)
        total, sample_rate_hz = sample_frames(sample), self.cfg.sample_rate_hz
        if total <= 0:
            raise SampleError("audio", f"flac holds {total} samples")
        start, length = crop_window(total, self.cfg.crop, sample_rate_hz,
                                    lambda: sample_rng(self.cfg.seed, epoch, unit, files["__key__"]))
        return Decoded(unit.name, position, sample, start, length, total / sample_rate_hz, unit.occurrence)

    def _fill(self, group: list[Decoded], out: torch.Tensor,
              corrupt: list[Corrupt]) -> tuple[torch.Tensor, list[Decoded]]:
        """Decode each sample of ``group`` into its row of ``out``, zero the rest of the row; a sample
        that does not decode is added to ``corrupt`` and the next one takes its row. Returns the filled
        rows (no wider than their longest sample) and the samples in them."""
        filled: list[Decoded] = []
        rows = out.numpy()  # numpy views: a tenth of the per-row cost of torch indexing
        for item in group:
            row = rows[len(filled)]
            try:
                decode_audio_into(item.sample, row[:item.length], item.start, self.cfg.sample_rate_hz)
            except SampleError as error:
                corrupt.append(Corrupt(item.unit, item.position, error.reason))
                continue
            row[item.length:] = 0.0
            filled.append(item)
        return out[:len(filled), :max((item.length for item in filled), default=0)], filled

    def _batch(self, assignment: Assignment, items: Iterator[Decoded | Corrupt]) -> Iterator[Delivery]:
        pending: list[Corrupt] = []

        def decoded_only() -> Iterator[Decoded]:
            for item in items:
                if isinstance(item, Corrupt):
                    pending.append(item)
                else:
                    yield item

        rate_hz, plan, role = self.cfg.sample_rate_hz, assignment.buckets, assignment.role
        groups = batch_by_seconds(decoded_only(), lambda d: d.length, sample_rate_hz=rate_hz,
                                  max_batch_seconds=self.cfg.max_batch_seconds,
                                  max_batch_size=self.cfg.max_batch_size, edges_seconds=plan.edges_seconds,
                                  batch_sizes=plan.batch_sizes,
                                  bucket_length_of=(lambda d: round(d.source_seconds * rate_hz))
                                  if plan.on_source_length else None)
        worker = get_worker_info()
        for group in groups:
            width = max(d.length for d in group)
            out, slot = ((torch.empty(len(group), width), None) if worker is None else
                         self.batch_slots.buffer(worker.id, len(group), width))
            waveforms, group = self._fill(group, out, pending)
            if not group:  # every sample was corrupt: the next delivery reports them
                if worker is not None:
                    self.batch_slots.unused(slot)
                continue
            batch = Batch(waveforms, torch.tensor([d.length for d in group]),
                          torch.tensor([d.sample.label for d in group]), [d.sample.id for d in group],
                          [d.sample.meta for d in group], [d.repeat for d in group])
            yield Delivery(role, batch if worker is None else self.batch_slots.pack(batch, slot),
                           [(d.unit, d.position) for d in group], pending[:], sum(d.source_seconds for d in group))
            pending.clear()
        yield Delivery(role, None, [], pending[:], 0.0)  # always: the main process learns the role is done


# ------------------------------------------------------------------------------------------ main side


@dataclass
class StreamStats:
    samples: int = 0
    seconds: float = 0.0  # delivered audio (after crop), padding excluded
    source_seconds: float = 0.0  # decoded audio before cropping
    batches: int = 0
    join_batches: int = 0
    corrupt: Counter = field(default_factory=Counter)
    padding: PaddingMeter = field(default_factory=PaddingMeter)


_WORKER_COUNTS_SAID: set[tuple[int, int]] = set()


@contextlib.contextmanager
def _worker_count_said_once(num_workers: int) -> Iterator[None]:
    """torch warns, at every DataLoader start and iteration, when there are more workers than CPUs
    this process may use; posttrain says it once per process, in its own words, and silences torch's."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    if num_workers > cpus and (num_workers, cpus) not in _WORKER_COUNTS_SAID:
        _WORKER_COUNTS_SAID.add((num_workers, cpus))
        log.warning("loader: %d worker processes on %d CPU(s) this process may use; they share the CPUs "
                    "(lower data.*.num_workers if loading is slow)", num_workers, cpus)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


class ShardStream:
    """The training loader: ``for batch in stream`` yields this rank's ``Batch``es of the current
    epoch (``B == 0`` join batches at the end, see the module docstring).

    Typical use::

        stream = ShardStream(cfg.data.train)               # rank/world size from posttrain.dist
        stream.load_state_dict(saved)                        # optional, the merged global state
        for epoch in range(stream.epoch, max_epochs):
            stream.set_epoch(epoch)                          # keeps a restored epoch's progress
            for batch in stream: ...
            ... checkpoint["loader"] = stream.global_state_dict()   # collective on every rank
    """

    def __init__(self, cfg: StreamConfig, rank: int | None = None, world_size: int | None = None,
                 epoch: int = 0):
        cfg.validate()
        if not cfg.shards:
            raise ValueError("stream.shards: no shard directories given")
        info = dist_info(rank, world_size)
        self.cfg, self.rank, self.world_size = cfg, info.rank, info.world_size
        self.num_roles = max(1, cfg.num_workers)
        self.sets = [ShardSet.load(directory, retry_policy(cfg)) for directory in cfg.shards]
        self.weights = list(cfg.weights) or [1.0] * len(self.sets)
        self.epoch = epoch
        self._fitted_buckets = bucket_plan(cfg, self.sets, self.weights)
        self._buckets = self._fitted_buckets  # the current epoch's (a restored epoch keeps its saved plan)
        self._consumed: dict[str, set[int]] = {}
        self._base: dict[str, set[int]] = {}  # consumed when the epoch's plan was made
        self._cursor = 0  # the role whose batch this rank hands out next
        self._stats = StreamStats()
        self._iterations = 0  # iterations started: an older, abandoned one must not read a newer one's data
        self._queues: list[Any] = []  # per worker: its assignment for each iteration
        self._loader: DataLoader | None = None
        self._reader = EpochReader(cfg, self.rank, self.world_size, self._queues)

    # -- epoch plan
    def _shard(self, unit: Unit) -> ShardInfo:
        return self.sets[unit.set_index].shards[unit.shard_index]

    def epoch_samples(self) -> int:
        """Samples in the whole current epoch, over all ranks (corrupt ones included)."""
        return sum(self._shard(u).samples for u in epoch_units(self.sets, self.weights, self.cfg.seed, self.epoch))

    def _role_tasks(self) -> list[list[UnitTask]]:
        """This rank's units per role, as the plan assigns them (see the module docstring)."""
        tasks = []
        for unit in epoch_units(self.sets, self.weights, self.cfg.seed, self.epoch):
            shard = self._shard(unit)
            base = self._base.get(unit.name, set())
            if len(base) < shard.samples:
                planned = np.setdiff1d(np.arange(shard.samples), np.fromiter(base, dtype=np.int64, count=len(base)))
                tasks.append(UnitTask(unit, shard.path, shard.bytes, shard.keys, planned,
                                      frozenset(self._consumed.get(unit.name, ())),
                                      shard.seconds * len(planned) / shard.samples))
        mine = [tasks[i] for i in balance([task.seconds for task in tasks], self.world_size)[self.rank]]
        return [[mine[i] for i in part] for part in balance([task.seconds for task in mine], self.num_roles)]

    # -- iteration
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; calling it with the epoch already current (e.g. just restored) keeps
        its progress."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._consumed, self._base, self._cursor = {}, {}, 0
            self._buckets = self._fitted_buckets

    def _deliveries(self, roles: list[list[UnitTask]]) -> Iterator[Delivery]:
        """Start the roles on this epoch's assignments: in the main process without workers, else in
        the stream's DataLoader workers, started on first use and kept for the next epochs (a fork per
        epoch costs ~0.1 CPU-s; workers that persist also keep their warm decoder state)."""
        assignments = [Assignment(self.epoch, role, len(roles), tasks, self._buckets) for role, tasks in enumerate(roles)]
        if not self.cfg.num_workers:
            return self._reader.deliveries(assignments[0])
        with _worker_count_said_once(self.cfg.num_workers):
            if self._loader is None:
                context = multiprocessing.get_context(self.cfg.worker_start_method)
                self._queues.extend(context.SimpleQueue() for _ in range(self.cfg.num_workers))
                self._reader.batch_slots = BatchSlots(self.cfg.num_workers, BATCH_SLOTS_PER_WORKER,
                                                      round(self.cfg.max_batch_seconds * self.cfg.sample_rate_hz),
                                                      context)
                # its own generator: the loader never draws from (and so never shifts) the global torch RNG
                self._loader = DataLoader(self._reader, batch_size=None, num_workers=self.cfg.num_workers,
                                          multiprocessing_context=context, persistent_workers=True,
                                          generator=torch.Generator())
            for queue, assignment in zip(self._queues, assignments):
                queue.put(assignment)  # taken by each worker as the iteration below starts
            return iter(self._loader)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the stream is garbage-collected)."""
        if self._loader is not None:
            iterator, self._loader = self._loader._iterator, None
            if iterator is not None:
                iterator._shutdown_workers()
            for queue in self._queues:
                queue.close()
            self._queues.clear()
            self._reader.batch_slots.close()

    def __iter__(self) -> Iterator[Batch]:
        self._iterations += 1
        iteration = self._iterations
        roles = self._role_tasks()
        batches = self._in_turn(self._deliveries(roles), len(roles))
        agree = self.world_size > 1 and is_initialized()
        while True:
            if iteration != self._iterations:
                raise RuntimeError("loader: this iteration was abandoned when a newer one of the same stream started")
            if self._loader is not None:
                self._reader.batch_slots.release_unreferenced()
            delivery = next(batches, None)
            counts = None
            if agree:
                counts = _agree(delivery.batch if delivery is not None else None)
                if counts is None:
                    return
            elif delivery is None:
                return
            if delivery is None:
                self._stats.join_batches += 1
                yield Batch.empty(global_counts=counts)
                continue
            self._record(delivery)
            delivery.batch.global_counts = counts
            yield delivery.batch

    def _in_turn(self, deliveries: Iterator[Delivery], num_roles: int) -> Iterator[Delivery]:
        """The roles' batches round-robin from ``self._cursor``, a role leaving the turn at its last
        delivery. The DataLoader's own interleave restarts at worker 0 and depends on which workers
        ended; this one is a function of the batches handed out, so a resume continues it."""
        waiting: dict[int, deque[Delivery]] = {role: deque() for role in range(num_roles)}
        role = self._cursor
        while waiting:
            while not waiting[role]:
                delivery = next(deliveries, None)
                if delivery is None:
                    raise RuntimeError(f"loader: role {role} ended without its last delivery")
                if isinstance(delivery.batch, PackedBatch):
                    delivery.batch = self._reader.batch_slots.unpack(delivery.batch)
                waiting[delivery.role].append(delivery)
            delivery = waiting[role].popleft()
            if delivery.batch is None:
                self._record(delivery)
                del waiting[role]
            later = [r for r in waiting if r > role]
            role = min(later or waiting, default=0)
            if delivery.batch is not None:
                self._cursor = role
                yield delivery

    def _record(self, delivery: Delivery) -> None:
        stats = self._stats
        for unit, position in delivery.consumed:
            self._consumed.setdefault(unit, set()).add(position)
        for corrupt in delivery.corrupt:
            self._consumed.setdefault(corrupt.unit, set()).add(corrupt.position)
            stats.corrupt[corrupt.reason] += 1
        stats.source_seconds += delivery.source_seconds
        if delivery.batch is not None:
            lengths = delivery.batch.lengths.tolist()
            stats.samples += len(lengths)
            stats.seconds += sum(lengths) / self.cfg.sample_rate_hz
            stats.batches += 1
            stats.padding.add(lengths)

    def stats(self) -> dict[str, Any]:
        """This rank's totals since construction."""
        s = self._stats
        return {"epoch": self.epoch, "samples": s.samples, "seconds": s.seconds,
                "source_seconds": s.source_seconds, "batches": s.batches, "join_batches": s.join_batches,
                "padded_seconds": s.padding.padded_samples / self.cfg.sample_rate_hz,
                "padding_fraction": s.padding.fraction, "corrupt": sum(s.corrupt.values()),
                "corrupt_by_reason": dict(s.corrupt)}

    # -- state
    def _identity(self) -> list[dict[str, Any]]:
        return [{"shards": len(s.shards), "samples": s.samples, "weight": w}
                for s, w in zip(self.sets, self.weights)]

    def state_dict(self) -> dict[str, Any]:
        """This rank's consumption (merge over ranks with ``global_state_dict`` before saving)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": self.epoch, "seed": self.cfg.seed,
                "sets": self._identity(), "consumed": _encode_units(self._consumed),
                "plan": {"world_size": self.world_size, "roles": self.num_roles, "base": _encode_units(self._base),
                         "buckets": self._buckets.to_json()},
                "cursors": {str(self.rank): self._cursor}}

    def global_state_dict(self) -> dict[str, Any]:
        """The union of every rank's state. A collective when a process group is initialised:
        call it on every rank."""
        if self.world_size > 1 and is_initialized():
            return merge_states(all_gather_objects(self.state_dict()))
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a (merged) state. At the saved world size and worker count the saved plan and
        cursors continue the epoch exactly; otherwise the remaining work is re-planned."""
        if state.get("format") != STATE_FORMAT or state.get("version") not in (1, 2, STATE_VERSION):
            raise ValueError(f"loader state: expected format {STATE_FORMAT} v{STATE_VERSION}, "
                             f"got {state.get('format')!r} v{state.get('version')!r}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"loader state: saved with seed {state['seed']}, config has {self.cfg.seed}")
        if state["sets"] != self._identity():
            raise ValueError(f"loader state: shard sets differ (saved {state['sets']}, now {self._identity()})")
        self.epoch = int(state["epoch"])
        self._consumed = _decode_units(state["consumed"])
        plan = state.get("plan")
        if plan is not None and (plan["world_size"], plan["roles"]) == (self.world_size, self.num_roles):
            self._base = _decode_units(plan["base"])
            self._cursor = int(state["cursors"].get(str(self.rank), 0))
            # version 2 plans predate bucket plans: their batches came from uniform edges
            self._buckets = (BucketPlan.from_json(plan["buckets"]) if "buckets" in plan else
                             BucketPlan(tuple(bucket_edges(self.cfg.num_buckets, longest_delivered_seconds(self.cfg)))))
        else:
            self._base, self._cursor = _decode_units(state["consumed"]), 0
            self._buckets = self._fitted_buckets


def _encode_units(positions: dict[str, set[int]]) -> dict[str, int | list[list[int]]]:
    return {unit: encode_positions(p) for unit, p in sorted(positions.items()) if p}


def _decode_units(encoded: dict[str, int | list[list[int]]]) -> dict[str, set[int]]:
    return {unit: decode_positions(p) for unit, p in encoded.items()}


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of the per-rank loader states of one epoch (what a checkpoint must hold)."""
    for name in ("epoch", "plan"):
        values = {json.dumps(state.get(name), sort_keys=True) for state in states}
        if len(values) != 1:
            raise ValueError(f"loader states disagree on the {name}: {sorted(values)}")
    consumed: dict[str, set[int]] = {}
    cursors: dict[str, int] = {}
    for state in states:
        for unit, positions in _decode_units(state["consumed"]).items():
            consumed.setdefault(unit, set()).update(positions)
        cursors.update(state.get("cursors", {}))
    return dict(states[0], consumed=_encode_units(consumed), cursors=cursors)


def _agree(batch: Batch | None) -> tuple[int, int] | None:
    """One SUM all_reduce of (has a batch, samples, audio samples): None when no rank has a batch
    this slot, else the slot's global (samples, audio samples), which the train step uses for its
    loss scale instead of a collective of its own."""
    local = [0, 0, 0] if batch is None else [1, len(batch), int(batch.lengths.sum())]
    totals = global_sums(torch.tensor(local, dtype=torch.int64, device=collective_device()), world_group())
    has_data, samples, audio_samples = totals.tolist()
    return (samples, audio_samples) if has_data else None
