"""One role's reading of an epoch: tars in, batches out, each with the positions it settles.

A *role* is a DataLoader worker (or the main process when there are none) with its *assignment*:
the units the plan gives it and everything its order, crops and batches depend on
(``posttrain.data.read_order``). It reads each unit's tar front to back on demand
(``posttrain.data.tar_samples``), takes the samples in the seeded order, draws each sample's crop
from its length, groups the samples into batches (``posttrain.data.batching``) and only then
decodes each sample's window straight into its row of the batch.

Why decode last
    A sample is batched on its length (its JSON's ``num_samples``, else its FLAC header's) and held
    as FLAC bytes until its batch is complete: no buffer per sample, no collation copy, and for a crop
    only the FLAC frames around the window are decoded (``decode_audio_into``). A sample that fails
    there (garbage audio, another length than its JSON says) is counted corrupt and the next sample
    takes its row. Workers fill shared-memory slots that come back once nothing in the main process
    can read the batch in them any more (``posttrain.data.batch_slots``).

What goes back
    A ``Delivery`` per batch: the batch, the ``(unit, position)`` of every sample in it, the corrupt
    or missing samples met since the last delivery (settled too: a resume neither retries nor loses
    them) and the source seconds read. A role's last delivery has no batch, so the main process learns
    the role is done. The main process records consumption when it hands a batch out, never when a
    worker prefetches it (``posttrain.data.stream``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from posttrain.config import StreamConfig
from posttrain.data.batch import Batch
from posttrain.data.batch_slots import BatchSlots, PackedBatch
from posttrain.data.batching import BucketPlan, batch_by_seconds
from posttrain.data.locations import RetryPolicy, open_shard
from posttrain.data.read_order import Unit, UnitTask, crop_window, read_order, sample_rng, seeded_rng
from posttrain.data.shard_set import retry_policy
from posttrain.data.shards import PendingSample, SampleError, decode_audio_into, parse_sample, sample_frames
from posttrain.data.tar_samples import TarDamage, tar_samples

log = logging.getLogger(__name__)


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


@dataclass
class Delivery:
    """What a role hands to the main process: a batch, or None as its last delivery, and the
    positions it settles."""

    role: int
    batch: Batch | PackedBatch | None  # packed between a worker and the main process
    consumed: list[tuple[str, int]]
    corrupt: list[Corrupt]
    source_seconds: float


@dataclass(frozen=True)
class Assignment:
    """What one role reads in one epoch: its units, and what its order, crops and batches depend on."""

    epoch: int
    role: int
    num_roles: int
    tasks: list[UnitTask]
    buckets: BucketPlan


class UnitReader:
    """Reads one unit's tar front to back, on demand: ``take(position)`` returns that member's files,
    holding the members read before it. Consumed members are never kept."""

    def __init__(self, task: UnitTask, policy: RetryPolicy):
        self.task = task
        self.position_of = {key: i for i, key in enumerate(task.keys)}
        self.stream = open_shard(task.path, task.bytes, policy)
        self.samples = tar_samples(self.stream, skip={task.keys[i] for i in task.skip})
        self.held: dict[int, dict[str, bytes]] = {}

    def take(self, position: int) -> dict[str, bytes] | None:
        """The files of the sample at ``position``, or None when the tar does not hold it (missing)."""
        while position not in self.held:
            try:
                key, files = next(self.samples, (None, None))
            except TarDamage as damage:
                log.warning("%s: %s; the samples after it count as missing", self.task.path, damage)
                return None
            if key is None:
                return None
            if key not in self.position_of:
                raise ValueError(f"{self.task.path}: member {key!r} is not listed in the shard index")
            self.held[self.position_of[key]] = files
        return self.held.pop(position)

    def close(self) -> None:
        self.samples.close()
        self.stream.close()


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
        return self._batch(assignment, self._read(assignment, self._order(assignment)))

    def _order(self, assignment: Assignment) -> list[tuple[int, int]]:
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

    def _read(self, assignment: Assignment, order: list[tuple[int, int]]) -> Iterator[Decoded | Corrupt]:
        tasks = assignment.tasks
        left = Counter(index for index, _ in order)
        readers: dict[int, UnitReader] = {}
        for index, position in order:
            reader = readers.get(index) or readers.setdefault(index, UnitReader(tasks[index], self.policy))
            files = reader.take(position)
            left[index] -= 1
            if not left[index]:  # close each tar as soon as its last sample is out
                readers.pop(index).close()
            unit = tasks[index].unit
            if files is None:
                yield Corrupt(unit.name, position, "missing")
                continue
            try:
                yield self._decode(assignment.epoch, unit, position, tasks[index].keys[position], files)
            except SampleError as error:
                yield Corrupt(unit.name, position, error.reason)

    def _decode(self, epoch: int, unit: Unit, position: int, key: str, files: dict[str, bytes]) -> Decoded:
        """Parse a sample and draw its crop from its length (its JSON's, else its FLAC header's); the
        audio waits, as FLAC bytes, to be decoded into its row of a batch."""
        sample = parse_sample(key, files)
        total, sample_rate_hz = sample_frames(sample), self.cfg.sample_rate_hz
        if total <= 0:
            raise SampleError("audio", f"flac holds {total} samples")
        start, length = crop_window(total, self.cfg.crop, sample_rate_hz,
                                    lambda: sample_rng(self.cfg.seed, epoch, unit, key))
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
                          [d.sample.meta for d in group], [d.repeat for d in group], [d.start for d in group])
            yield Delivery(role, batch if worker is None else self.batch_slots.pack(batch, slot),
                           [(d.unit, d.position) for d in group], pending[:], sum(d.source_seconds for d in group))
            pending.clear()
        yield Delivery(role, None, [], pending[:], 0.0)  # always: the main process learns the role is done
