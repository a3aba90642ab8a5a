"""The training loader: epochs of WebDataset shard sets split over rank x worker, with an exactly-once,
resumable state.

This module is the main-process side: the plan of an epoch, the hand-out of the roles' batches, the
statistics and the state. Its parts, each in its own module:
``shard_set`` (what the indexes list), ``read_order`` (units, split, sample order, crop windows: pure
functions of the seed), ``batching`` (the bucket plan and the batcher), ``epoch_reader`` (a role reading
its tars into batches), ``tar_samples`` (the tar reader) and ``batch_slots`` (the shared-memory buffers
that carry a worker's batches to the main process).

The plan
    The units of an epoch, split over ranks and roles (one per DataLoader worker, one when the main
    process reads) and balanced by seconds to read, are the epoch's *plan*: a function of
    ``(seed, epoch, world size, roles)`` and of the positions already consumed when it was made (its
    ``base``, empty unless a resume changed the world size or the worker count, which re-balances the
    remaining work). The bucket plan of ``bucket_policy`` is derived once from the indexes and saved in
    the plan of the state, so a resumed epoch batches with the same buckets.

Exactly once and exact resume
    The state holds ``{epoch, seed, consumed: {unit: positions}, plan, cursors}`` (positions encoded as
    ``read_order.encode_positions``). Consumption is recorded in the main process when a batch is
    handed out, never when a worker prefetches. Corrupt or missing samples are recorded as consumed too
    (and counted), so a resume neither retries nor loses them. The main process takes the roles'
    batches in turn (round-robin; a finished role leaves the turn) and ``cursors`` keeps each rank's
    next role. A role's consumed batches are a prefix of its batch sequence and the batcher restarts
    identically on what remains (see ``batch_by_seconds``), so a resume at the same world size and
    worker count hands out exactly the batches of an uninterrupted run, in the same order. Otherwise
    the remaining work is re-planned: every sample is still read exactly once. ``global_state_dict()``
    merges the states of all ranks (one ``all_gather_object``).

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
import json
import logging
import multiprocessing
import os
import signal
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from posttrain.config import StreamConfig
from posttrain.data.batch import Batch
from posttrain.data.batch_slots import BATCH_SLOTS_PER_WORKER, BatchSlots, PackedBatch
from posttrain.data.batching import BucketPlan, PaddingMeter, bucket_plan, uniform_plan
from posttrain.data.epoch_reader import Assignment, Delivery, EpochReader
from posttrain.data.read_order import Unit, UnitTask, balance, decode_positions, encode_positions, epoch_units
from posttrain.data.shard_set import ShardInfo, ShardSet, retry_policy
from posttrain.dist import all_gather_objects, collective_device, dist_info, global_sums, is_initialized, world_group

log = logging.getLogger(__name__)

STATE_FORMAT = "posttrain-stream"
STATE_VERSION = 3  # v1 states (no plan) load re-planned; v2 plans (no bucket plan) had uniform edges


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


# What the launchers ask SLURM to send before a time limit (sbatch: USR1, submitit: USR2); SLURM signals every
# process of a job step, loader workers included.
SCHEDULER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def ignore_scheduler_signals(worker_id: int) -> None:
    """A loader worker ignores the scheduler's warnings: its rank checkpoints and then stops it, and a
    worker would otherwise die of the default action (spawned) or run the rank's handler (forked). One that
    came while the worker started waited, blocked (``scheduler_signals_blocked``); ignored, it is dropped."""
    for number in SCHEDULER_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SCHEDULER_SIGNALS)


@contextlib.contextmanager
def scheduler_signals_blocked() -> Iterator[None]:
    """Workers start with this thread's signal mask (fork, spawn and a forkserver started here alike): with
    the warnings blocked, one sent before a worker ran ``ignore_scheduler_signals`` cannot kill it. The rank
    gets its own when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SCHEDULER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
        assignments = [Assignment(self.epoch, role, len(roles), tasks, self._buckets)
                       for role, tasks in enumerate(roles)]
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
                                          generator=torch.Generator(), worker_init_fn=ignore_scheduler_signals)
            # the iteration first: it starts (or resumes) the workers, which then take their assignments;
            # a worker not yet reading its queue would block a put larger than a pipe holds (64 KiB)
            with scheduler_signals_blocked():
                deliveries = iter(self._loader)
            for queue, assignment in zip(self._queues, assignments):
                queue.put(assignment)
            return deliveries

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the stream is garbage-collected)."""
        if self._loader is not None:
            iterator, self._loader = self._loader._iterator, None
            if iterator is not None:
                iterator._shutdown_workers()
            for queue in self._queues:
                queue.close()
            self._queues.clear()

    def __iter__(self) -> Iterator[Batch]:
        self._iterations += 1
        iteration = self._iterations
        roles = self._role_tasks()
        batches = self._in_turn(self._deliveries(roles), len(roles))
        agree = self.world_size > 1 and is_initialized()
        while True:
            if iteration != self._iterations:
                raise RuntimeError("loader: this iteration was abandoned when a newer one of the same stream started")
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
            self._buckets = BucketPlan.from_json(plan["buckets"]) if "buckets" in plan else uniform_plan(self.cfg)
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
