"""The admission bound of `posttrain serve` (audio samples in flight, a bounded FIFO queue, timeouts) and
the batcher's turn-taking (a short request is not stuck behind the windows of long ones)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from posttrain.serve.engine import Admission, Batcher, Busy


def test_admission_bounds_samples_queues_in_order_and_refuses_beyond_the_queue():
    async def scenario():
        gate = Admission(max_samples=10, max_queue=2, timeout_seconds=5.0)
        await gate.acquire(6)
        order: list[str] = []

        async def waiter(name: str, samples: int):
            await gate.acquire(samples)
            order.append(name)

        first = asyncio.create_task(waiter("a", 5))  # 6 + 5 > 10: waits
        second = asyncio.create_task(waiter("b", 1))  # would fit, but a FIFO queue keeps it behind "a"
        await asyncio.sleep(0.01)
        assert order == [] and len(gate.waiting) == 2
        with pytest.raises(Busy, match="queued"):
            await gate.acquire(1)  # the queue is full
        gate.release(6)
        await asyncio.gather(first, second)
        assert order == ["a", "b"] and gate.in_flight == 6
        gate.release(5)
        gate.release(1)
        assert gate.in_flight == 0 and not gate.waiting
        with pytest.raises(RuntimeError, match="more than it admitted"):
            gate.release(1)

    asyncio.run(scenario())


def test_a_wait_that_times_out_or_is_cancelled_leaves_nothing_behind():
    async def scenario():
        gate = Admission(max_samples=10, max_queue=4, timeout_seconds=0.05)
        await gate.acquire(10)
        with pytest.raises(Busy, match="waited"):
            await gate.acquire(1)
        assert not gate.waiting
        task = asyncio.create_task(gate.acquire(2))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away while queued
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not gate.waiting
        gate.overdraw(3)  # a file longer than its header said: admitted beyond the bound, released as usual
        assert gate.in_flight == 13
        gate.release(13)
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_many_random_acquires_and_releases_end_at_exactly_zero():
    """Thousands of odd-sized admissions, some timing out or cancelled: the count ends at 0, never below
    (a float sum of seconds drifted to -1e-13 and read as a negative gauge)."""
    async def scenario():
        rng = np.random.default_rng(0)
        gate = Admission(max_samples=16000 * 7, max_queue=50, timeout_seconds=0.02)

        async def client(samples: int):
            try:
                await gate.acquire(samples)
            except Busy:
                return
            await asyncio.sleep(float(rng.uniform(0, 0.003)))
            assert gate.in_flight >= 0
            gate.release(samples)

        tasks = [asyncio.create_task(client(int(rng.integers(1, 16000 * 3)))) for _ in range(400)]
        await asyncio.sleep(0.01)
        for task in tasks[::7]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.in_flight == 0 and not gate.waiting

    asyncio.run(scenario())


class _Recorder(torch.nn.Module):
    """A stand-in detector that records which windows each forward pass held (by their first sample)."""

    def __init__(self, gate: threading.Event):
        super().__init__()
        self.passes: list[list[float]] = []
        self.gate = gate

    def normalise(self, waves, lengths):
        return waves

    def embed(self, waves, lengths):
        self.gate.wait()
        self.passes.append(waves[:, 0].tolist())
        return waves[:, :2]

    def head(self, pooled):
        return pooled


def test_a_short_request_joins_the_next_pass_ahead_of_long_requests_windows():
    """Two long requests of 6 windows each are queued while the device is busy, then one short request:
    the short window rides in the next pass or the one after (not behind all 12), every window is scored
    once, and each request's windows go through in their own order."""
    gate = threading.Event()
    model = _Recorder(gate)
    batcher = Batcher(model, torch.device("cpu"), max_batch_seconds=1.0, max_batch_size=2, max_wait_ms=0)
    window = lambda marker: np.full(1600, float(marker), np.float32)  # noqa: E731 - a window is its marker
    try:
        blocker = batcher.submit([window(900)])  # holds the device while the queue fills
        long_a = batcher.submit([window(100 + i) for i in range(6)])
        long_b = batcher.submit([window(200 + i) for i in range(6)])
        short = batcher.submit([window(500)])
        gate.set()
        for future in blocker + long_a + long_b + short:
            future.result(timeout=10)
    finally:
        batcher.close()
    markers = [int(v) for pass_ in model.passes for v in pass_]
    assert sorted(markers) == sorted([900, 500, *range(100, 106), *range(200, 206)])
    short_pass = next(i for i, pass_ in enumerate(model.passes) if 500.0 in pass_)
    assert short_pass <= 2, model.passes  # the blocker's pass, at most one more, then the short one
    assert [m for m in markers if m < 200] == list(range(100, 106))
    assert [m for m in markers if 200 <= m < 300] == list(range(200, 206))
