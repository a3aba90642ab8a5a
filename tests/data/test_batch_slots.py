"""The shared-memory batch slots on their own: what a consumer may do with a batch (see the module
docstring of ``posttrain.data.batch_slots``). One process plays both sides: the worker fills and packs,
the main process unpacks; the slot states are what both would share."""

import ctypes

import numpy as np
import torch
import torch.multiprocessing as mp

from posttrain.data.batch import Batch
from posttrain.data.batch_slots import BatchSlots

ROWS, WIDTH = 2, 4


def _slots(per_worker: int) -> BatchSlots:
    return BatchSlots(1, per_worker, ROWS * WIDTH, mp.get_context("fork"))


def _hand_over(slots: BatchSlots, value: float) -> tuple[Batch, int | None]:
    """A batch of ``value``s filled by worker 0 and received by the main process, and its slot."""
    out, slot = slots.buffer(0, ROWS, WIDTH)
    out.fill_(value)
    sent = Batch(out, torch.full((ROWS,), WIDTH), torch.ones(ROWS, dtype=torch.long), ["a", "b"], [{}, {}], [0, 0],
                 [0, 0])
    return slots.unpack(slots.pack(sent, slot)), slot


def test_a_view_or_array_kept_past_the_next_batch_keeps_its_slot():
    slots = _slots(per_worker=2)
    batch, slot = _hand_over(slots, 1.0)
    view, array = batch.waveforms[1:, 1:3], batch.waveforms[0].numpy()
    del batch
    assert slots.states[slot] == BatchSlots.SENT
    later, other = _hand_over(slots, 2.0)
    assert other != slot and slots.buffer(0, ROWS, WIDTH)[1] is None  # no free slot: a fresh buffer, no wait
    assert bool((view == 1.0).all()) and bool((array == 1.0).all())
    del view
    assert slots.states[slot] == BatchSlots.SENT  # the array still reads it
    del array
    assert slots.states[slot] == BatchSlots.FREE  # the moment the last reader is gone
    assert _hand_over(slots, 3.0)[1] == slot
    assert bool((later.waveforms == 2.0).all())


def _hold(received, replies) -> None:
    waveforms = received.get()
    replies.put("held")
    assert received.get() == "check"
    replies.put(waveforms.tolist())


def test_a_batch_sent_to_another_process_leaves_its_slot_with_its_own_copy():
    """torch moves a batch that is not in its own shared memory into a fresh segment as it sends it:
    the slot comes back at once and is filled again while the other process still reads the first batch."""
    context = mp.get_context("fork")
    slots = BatchSlots(1, 1, ROWS * WIDTH, context)
    batch, slot = _hand_over(slots, 1.0)
    received, replies = context.SimpleQueue(), context.SimpleQueue()
    child = context.Process(target=_hold, args=(received, replies))
    child.start()
    try:
        received.put(batch.waveforms)
        assert replies.get() == "held"
        assert slots.states[slot] == BatchSlots.FREE
        again, same = _hand_over(slots, 2.0)
        assert same == slot and bool((again.waveforms == 2.0).all())
        received.put("check")
        assert replies.get() == [[1.0] * WIDTH] * ROWS
        assert bool((batch.waveforms == 1.0).all())  # this process's batch moved to the copy too
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0


def test_a_raw_address_does_not_hold_a_slot():
    """Unsafe by design: an address is not a reference, so the slot is filled again under it."""
    slots = _slots(per_worker=1)
    batch, slot = _hand_over(slots, 1.0)
    address = batch.waveforms.data_ptr()
    del batch
    assert slots.states[slot] == BatchSlots.FREE
    again, same = _hand_over(slots, 2.0)
    assert same == slot and again.waveforms.data_ptr() == address
    assert np.all(np.ctypeslib.as_array((ctypes.c_float * (ROWS * WIDTH)).from_address(address)) == 2.0)
