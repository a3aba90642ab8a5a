"""Shared-memory batch buffers that DataLoader workers reuse, and the hand-over of batches in them.

Why slots
    A fresh shared buffer per batch costs the worker a page fault and the zeroing of every page it
    writes (0.12 CPU-s per audio-hour at 16 kHz, a tenth of decoding it), and torch passes each
    buffer's file descriptor over a socket with an authentication handshake. A slot is allocated once
    by its worker and goes to the main process with the first batch written in it (torch passes its
    descriptor then, once); later batches in it travel as ``(slot, shape)`` and the main process reads
    them where the worker wrote them, without a copy.

Lifetime
    Each worker owns ``per_worker`` slots of ``slot_floats`` floats. A slot is ``SENT`` from the moment
    a worker fills a batch into it. In the main process the batch's waveforms are a tensor over a
    numpy array made for that batch alone (its *lease*), and the slot turns ``FREE`` when the lease
    is freed: when the last tensor or array that can reach the batch's memory is gone, whatever the
    consumer did with it, at that moment (a finalizer; the loader itself lets go of a batch when the
    next one is asked for), instead of being polled for at the next batch. A worker that finds no
    free slot, or a batch larger than a slot, fills a fresh buffer instead: it never waits. A batch the
    DataLoader drops (an abandoned iteration) leaves its slot ``SENT``: the pool shrinks, nothing is
    overwritten. Only public APIs: ``share_memory_``, ``torch.from_numpy``, ``weakref.finalize``.

What a consumer may do with a batch (``tests/data/test_batch_slots.py``: a view kept, a batch sent, an address)
    - Keep it, a view of it (slicing, ``view``, ``as_strided``) or a numpy array of it
      (``.numpy()``), past the next batch and for as long as it likes: **safe**. Each of them keeps
      the lease alive, so the slot is not written again until the last of them is gone.
    - Send it (or a view) to another process through torch's multiprocessing (a queue, a pipe,
      a DataLoader): **safe**. The memory is not torch's own shared memory, so torch copies it into
      a fresh shared segment on the way out and moves the batch's storage there, in this process
      too; the lease is freed and the slot comes back. A numpy array taken from the batch *before* it
      was sent still points at the slot: take it after sending, or copy.
    - Copy it (``clone``, ``pin_memory``, ``to(device)``): safe; the slot returns once the original
      batch is dropped.
    - Hold a raw address (``data_ptr()``, or a pointer handed to C code) without a tensor or array
      that owns it: **unsafe**. Nothing can track an address; once the tensors are gone the slot is
      filled with another batch at the same address.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posttrain.data.batch import Batch

# Batches a worker may have out at once before it falls back to fresh buffers: the DataLoader's
# prefetch (2), the main process's round-robin queue and the batches a train step holds.
BATCH_SLOTS_PER_WORKER = 8


@dataclass
class PackedBatch:
    """A batch on its way from a worker to the main process. The waveforms are rows ``row_stride``
    floats apart (wider than ``shape`` when corrupt samples left the buffer's longest row empty) in
    slot ``slot`` or, with ``slot`` None, in ``memory`` itself (a fresh buffer). ``memory`` is the
    slot's whole buffer with the slot's first batch and None with later ones. The rest goes by value
    (torch would put every small tensor in a shared-memory file of its own)."""

    slot: int | None
    memory: torch.Tensor | None
    shape: tuple[int, int]
    row_stride: int
    lengths: list[int]
    labels: list[int]
    ids: list[str]
    meta: list[dict[str, Any]]
    repeats: list[int]
    offsets_samples: list[int]


def _release(states: Any, slot: int) -> None:
    states[slot] = BatchSlots.FREE


class BatchSlots:
    """The slots of one stream's workers (see the module docstring); ``states`` is shared by the
    workers and the main process, the rest is each process's own."""

    UNUSED, SENT, FREE = 0, 1, 2

    def __init__(self, num_workers: int, per_worker: int, slot_floats: int, context: Any):
        self.per_worker, self.slot_floats = per_worker, slot_floats
        self.states = context.RawArray("b", num_workers * per_worker)
        self._owned: dict[int, torch.Tensor] = {}  # worker side: its slots, flat
        self._announced: set[int] = set()  # worker side: slots whose buffer went out with a batch
        self._mapped: dict[int, np.ndarray] = {}  # main side: every slot a batch came in, flat

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker starts with no slots of its own
        return dict(self.__dict__, _owned={}, _announced=set(), _mapped={})

    # -- worker side
    def buffer(self, worker: int, rows: int, width: int) -> tuple[torch.Tensor, int | None]:
        """A ``[rows, width]`` tensor to fill a batch into, and its slot (None: a fresh buffer)."""
        if rows * width <= self.slot_floats:
            mine = range(worker * self.per_worker, (worker + 1) * self.per_worker)
            slot = next((i for i in mine if self.states[i] == self.FREE), None)
            slot = slot if slot is not None else next((i for i in mine if self.states[i] == self.UNUSED), None)
            if slot is not None:
                if slot not in self._owned:
                    # copying the new (untouched) tensor into shared memory costs what its first fill would
                    self._owned[slot] = torch.empty(self.slot_floats).share_memory_()
                self.states[slot] = self.SENT
                return self._owned[slot][:rows * width].view(rows, width), slot
        return torch.empty(rows, width), None

    def unused(self, slot: int | None) -> None:
        """A buffer that was not sent after all (every sample in it was corrupt)."""
        if slot is not None:
            self.states[slot] = self.FREE

    def pack(self, batch: Batch, slot: int | None) -> PackedBatch:
        """The buffer goes with a slot's first batch only: a slot comes back ``FREE`` only after the
        main process received a batch in it, so a first batch the DataLoader dropped leaves its slot
        ``SENT`` for good, and a slot sent again is one the main process has mapped."""
        waveforms = batch.waveforms
        if slot is None:
            memory = waveforms
        else:
            memory = None if slot in self._announced else self._owned[slot]
            self._announced.add(slot)
        return PackedBatch(slot, memory, tuple(waveforms.shape), waveforms.stride(0), batch.lengths.tolist(),
                           batch.labels.tolist(), batch.ids, batch.meta, batch.repeats, batch.offsets_samples)

    # -- main side
    def unpack(self, packed: PackedBatch) -> Batch:
        """The batch, its waveforms over the slot under a lease that frees the slot when it dies."""
        waveforms = packed.memory
        if packed.slot is not None:
            if packed.memory is not None:
                self._mapped[packed.slot] = packed.memory.numpy()
            rows, width = packed.shape
            lease = self._mapped[packed.slot][:rows * packed.row_stride].reshape(rows, packed.row_stride)[:, :width]
            weakref.finalize(lease, _release, self.states, packed.slot).atexit = False
            waveforms = torch.from_numpy(lease)
        return Batch(waveforms, torch.tensor(packed.lengths, dtype=torch.long),
                     torch.tensor(packed.labels, dtype=torch.long), packed.ids, packed.meta, packed.repeats,
                     packed.offsets_samples)
