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
    DataLoader workers, both balanced by seconds still to read (greedy longest-first, the index
    holds per-shard seconds). Inside a worker, samples pass a seeded shuffle buffer and are grouped
    by ``posttrain.data.batching`` into batches of bounded padded seconds.

Exactly once
    The state is ``{epoch, seed, consumed: {unit: positions}}`` where positions are indexes into the
    shard's ``keys`` list, stored as a count ``k`` (positions ``0..k-1``; a fully read shard is its
    sample count) or a list of ``[start, stop)`` ranges. Consumption is recorded in the main process
    when a batch is handed out, never when a worker prefetches. Corrupt or missing samples are
    recorded as consumed too (and counted), so a resume neither retries nor loses them. On resume,
    fully consumed units are dropped and workers skip consumed members while reading the tar; the
    remaining work is re-split for the current world size and worker count, so both may change.
    ``global_state_dict()`` merges the states of all ranks (one ``all_gather_object``).

Equal batch counts
    When a process group is initialised and ``world_size > 1``, each step costs one ``all_reduce``
    of a single int (MAX of "I still have data"): a latency-bound collective of a few bytes, tens of
    microseconds on NVLink/InfiniBand and well under a millisecond with gloo, negligible next to a
    training step. A rank out of data yields join batches (``Batch.empty()``) until every rank is
    done, so collectives never hang; the trainer multiplies a join batch's loss by zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from posttrain.config import CropConfig, StreamConfig
from posttrain.data.audio import decode_flac
from posttrain.data.batch import LABEL_IDS, Batch
from posttrain.data.batching import PaddingMeter, batch_by_seconds, bucket_edges
from posttrain.data.shards import INDEX_NAME, ShardFormatError, load_index, shard_paths
from posttrain.dist import dist_info

STATE_FORMAT = "posttrain-stream"
STATE_VERSION = 1

# ------------------------------------------------------------------------------------------ shard sets


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int
    seconds: float
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ShardSet:
    directory: str
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @staticmethod
    def load(directory: str | Path) -> "ShardSet":
        """Read ``index.json``; a missing tar or an index that disagrees with itself raises
        ``ShardFormatError`` naming the file."""
        index = load_index(directory)
        index_path = Path(directory) / INDEX_NAME
        shards = []
        for row, (entry, path) in enumerate(zip(index["shards"], shard_paths(directory, index))):
            if not path.is_file():
                raise ShardFormatError(f"{index_path}: shards[{row}] {path} does not exist")
            if len(entry["keys"]) != entry["samples"]:
                raise ShardFormatError(f"{index_path}: shards[{row}] lists {len(entry['keys'])} keys "
                                       f"for {entry['samples']} samples")
            shards.append(ShardInfo(str(path), int(entry["samples"]), float(entry["seconds"]),
                                    tuple(entry["keys"])))
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
    """What a worker needs to read one unit: the tar, its keys and the positions to skip."""

    unit: Unit
    path: str
    keys: tuple[str, ...]
    skip: frozenset[int]
    seconds_left: float


# --------------------------------------------------------------------------------------- per sample


def crop_window(num_samples: int, crop: CropConfig, sample_rate_hz: int,
                rng: np.random.Generator) -> tuple[int, int]:
    """``(start, length)`` of the crop. ``antideepfake``: files longer than ``crop_above_seconds``
    get one crop of uniform random length in [min_seconds, max_seconds] at a uniform random start;
    ``fixed``: files longer than ``fixed_seconds`` get a random window of that length (shorter ones
    stay whole, batches pad them); ``none``: the whole file."""
    if crop.policy == "antideepfake" and num_samples > crop.crop_above_seconds * sample_rate_hz:
        low, high = round(crop.min_seconds * sample_rate_hz), round(crop.max_seconds * sample_rate_hz)
        length = min(int(rng.integers(low, high + 1)), num_samples)
    elif crop.policy == "fixed" and num_samples > crop.fixed_seconds * sample_rate_hz:
        length = round(crop.fixed_seconds * sample_rate_hz)
    else:
        return 0, num_samples
    return int(rng.integers(0, num_samples - length + 1)), length


def sample_rng(seed: int, epoch: int, unit: Unit, key: str) -> np.random.Generator:
    """Per-sample generator: the same crop on resume, a different one each epoch and repeat."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{unit.set_index}/{unit.occurrence}/{key}".encode(),
                             digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass
class Decoded:
    unit: str
    position: int
    wave: torch.Tensor
    label: int
    sample_id: str
    meta: dict[str, Any]
    source_seconds: float


@dataclass
class Corrupt:
    unit: str
    position: int
    reason: str


class CorruptSample(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


# ---------------------------------------------------------------------------------------- worker side


@dataclass
class Delivery:
    """What a worker hands to the main process: a batch (or None) and the positions it settles."""

    batch: Batch | None
    consumed: list[tuple[str, int]]
    corrupt: list[Corrupt]
    source_seconds: float


class TarErrors:
    """A webdataset exception handler that counts instead of sleeping (``warn_and_continue`` sleeps
    0.5 s per error); samples a tar error loses are later accounted as ``missing``."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: Exception) -> bool:
        self.count += 1
        return True


class EpochReader(IterableDataset):
    """One rank's share of an epoch; each DataLoader worker reads its own seconds-balanced part."""

    def __init__(self, cfg: StreamConfig, epoch: int, rank: int, tasks: list[UnitTask]):
        super().__init__()
        self.cfg, self.epoch, self.rank, self.tasks = cfg, epoch, rank, tasks

    def __iter__(self) -> Iterator[Delivery]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part = balance([task.seconds_left for task in self.tasks], num_workers)[worker]
        tasks = [self.tasks[i] for i in part]
        stages: list[Any] = [lambda: self._read(tasks)]
        if self.cfg.shuffle_buffer > 1:
            rng = random.Random(f"{self.cfg.seed}/{self.epoch}/{self.rank}/{worker}/{num_workers}/shuffle")
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng))
        stages.append(self._batch)
        return iter(wds.DataPipeline(*stages))

    def _read(self, tasks: list[UnitTask]) -> Iterator[Decoded | Corrupt]:
        for task in tasks:
            yield from self._read_unit(task)

    def _read_unit(self, task: UnitTask) -> Iterator[Decoded | Corrupt]:
        name = task.unit.name
        position_of = {key: i for i, key in enumerate(task.keys)}
        skip_keys = {task.keys[i] for i in task.skip}
        seen = set(task.skip)
        samples = wds.tarfile_samples([{"url": task.path}], handler=TarErrors(),
                                      select_files=lambda fname: fname.split(".", 1)[0] not in skip_keys)
        for sample in samples:
            key = sample["__key__"]
            if key not in position_of:
                raise ValueError(f"{task.path}: member {key!r} is not listed in the shard index")
            position = position_of[key]
            seen.add(position)
            try:
                yield self._decode(task.unit, position, sample)
            except CorruptSample as error:
                yield Corrupt(name, position, error.reason)
        yield from (Corrupt(name, p, "missing") for p in range(len(task.keys)) if p not in seen)

    def _decode(self, unit: Unit, position: int, sample: dict[str, Any]) -> Decoded:
        if "json" not in sample or "flac" not in sample:
            raise CorruptSample("incomplete", f"{sample['__key__']} has {sorted(sample)}")
        try:
            meta = json.loads(sample["json"])
            label = LABEL_IDS[meta["label"]]
        except (ValueError, KeyError, TypeError) as error:
            raise CorruptSample("json", repr(error)) from None
        try:
            samples, sample_rate_hz = decode_flac(sample["flac"])
        except (RuntimeError, ValueError, TypeError) as error:  # soundfile's errors are RuntimeErrors
            raise CorruptSample("audio", repr(error)) from None
        if sample_rate_hz != self.cfg.sample_rate_hz or samples.size == 0:
            raise CorruptSample("audio", f"{samples.size} samples at {sample_rate_hz} Hz")
        rng = sample_rng(self.cfg.seed, self.epoch, unit, sample["__key__"])
        start, length = crop_window(samples.size, self.cfg.crop, sample_rate_hz, rng)
        wave = torch.from_numpy(samples[start:start + length])  # a view: collation copies it once
        return Decoded(unit.name, position, wave, label, str(meta.get("id", sample["__key__"])), meta,
                       samples.size / sample_rate_hz)

    def _batch(self, items: Iterator[Decoded | Corrupt]) -> Iterator[Delivery]:
        pending: list[Corrupt] = []

        def decoded_only() -> Iterator[Decoded]:
            for item in items:
                if isinstance(item, Corrupt):
                    pending.append(item)
                else:
                    yield item

        crop = self.cfg.crop
        longest_seconds = {"antideepfake": max(crop.crop_above_seconds, crop.max_seconds),
                           "fixed": crop.fixed_seconds, "none": self.cfg.max_batch_seconds}[crop.policy]
        groups = batch_by_seconds(decoded_only(), lambda d: d.wave.numel(),
                                  sample_rate_hz=self.cfg.sample_rate_hz,
                                  max_batch_seconds=self.cfg.max_batch_seconds,
                                  max_batch_size=self.cfg.max_batch_size,
                                  edges_seconds=bucket_edges(self.cfg.num_buckets, longest_seconds))
        for group in groups:
            batch = Batch.collate([d.wave for d in group], [d.label for d in group],
                                  [d.sample_id for d in group], [d.meta for d in group])
            yield Delivery(batch, [(d.unit, d.position) for d in group], pending[:],
                           sum(d.source_seconds for d in group))
            pending.clear()
        if pending:
            yield Delivery(None, [], pending[:], 0.0)


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
        self.sets = [ShardSet.load(directory) for directory in cfg.shards]
        self.weights = list(cfg.weights) or [1.0] * len(self.sets)
        self.epoch = epoch
        self._consumed: dict[str, set[int]] = {}
        self._stats = StreamStats()

    # -- epoch plan
    def _shard(self, unit: Unit) -> ShardInfo:
        return self.sets[unit.set_index].shards[unit.shard_index]

    def epoch_samples(self) -> int:
        """Samples in the whole current epoch, over all ranks (corrupt ones included)."""
        return sum(self._shard(u).samples for u in epoch_units(self.sets, self.weights, self.cfg.seed, self.epoch))

    def _rank_tasks(self) -> list[UnitTask]:
        tasks = []
        for unit in epoch_units(self.sets, self.weights, self.cfg.seed, self.epoch):
            shard = self._shard(unit)
            skip = frozenset(self._consumed.get(unit.name, ()))
            if len(skip) < shard.samples:
                seconds_left = shard.seconds * (shard.samples - len(skip)) / shard.samples
                tasks.append(UnitTask(unit, shard.path, shard.keys, skip, seconds_left))
        part = balance([task.seconds_left for task in tasks], self.world_size)[self.rank]
        return [tasks[i] for i in part]

    # -- iteration
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; calling it with the epoch already current (e.g. just restored) keeps
        its progress."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._consumed = {}

    def __iter__(self) -> Iterator[Batch]:
        reader = EpochReader(self.cfg, self.epoch, self.rank, self._rank_tasks())
        loader = DataLoader(reader, batch_size=None, num_workers=self.cfg.num_workers,
                            multiprocessing_context=self.cfg.worker_start_method if self.cfg.num_workers else None)
        deliveries = iter(loader)
        agree = self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()
        while True:
            delivery = self._next_batch(deliveries)
            if agree:
                if not _any_rank(delivery is not None):
                    return
            elif delivery is None:
                return
            if delivery is None:
                self._stats.join_batches += 1
                yield Batch.empty()
                continue
            self._record(delivery)
            yield delivery.batch

    def _next_batch(self, deliveries: Iterator[Delivery]) -> Delivery | None:
        for delivery in deliveries:
            if delivery.batch is not None:
                return delivery
            self._record(delivery)
        return None

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
                "sets": self._identity(),
                "consumed": {unit: encode_positions(p) for unit, p in sorted(self._consumed.items()) if p}}

    def global_state_dict(self) -> dict[str, Any]:
        """The union of every rank's state. A collective when a process group is initialised:
        call it on every rank."""
        if self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized():
            states: list[Any] = [None] * torch_dist.get_world_size()
            torch_dist.all_gather_object(states, self.state_dict())
            return merge_states(states)
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: expected format {STATE_FORMAT} v{STATE_VERSION}, "
                             f"got {state.get('format')!r} v{state.get('version')!r}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"loader state: saved with seed {state['seed']}, config has {self.cfg.seed}")
        if state["sets"] != self._identity():
            raise ValueError(f"loader state: shard sets differ (saved {state['sets']}, now {self._identity()})")
        self.epoch = int(state["epoch"])
        self._consumed = {unit: decode_positions(p) for unit, p in state["consumed"].items()}


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of the per-rank loader states of one epoch (what a checkpoint must hold)."""
    epochs = {state["epoch"] for state in states}
    if len(epochs) != 1:
        raise ValueError(f"loader states disagree on the epoch: {sorted(epochs)}")
    consumed: dict[str, set[int]] = {}
    for state in states:
        for unit, encoded in state["consumed"].items():
            consumed.setdefault(unit, set()).update(decode_positions(encoded))
    merged = dict(states[0])
    merged["consumed"] = {unit: encode_positions(p) for unit, p in sorted(consumed.items())}
    return merged


def _any_rank(has_data: bool) -> bool:
    """One MAX all_reduce of a single int: does any rank still have a batch this step?"""
    device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(has_data)], dtype=torch.int32, device=device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return bool(flag.item())
