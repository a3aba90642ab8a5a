"""The admission bound of `posttrain serve`: audio seconds in flight, a bounded FIFO queue, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from posttrain.serve.engine import Admission, Busy


def test_admission_bounds_seconds_queues_in_order_and_refuses_beyond_the_queue():
    async def scenario():
        gate = Admission(max_seconds=10.0, max_queue=2, timeout_seconds=5.0)
        await gate.acquire(6.0)
        order: list[str] = []

        async def waiter(name: str, seconds: float):
            await gate.acquire(seconds)
            order.append(name)

        first = asyncio.create_task(waiter("a", 5.0))  # 6 + 5 > 10: waits
        second = asyncio.create_task(waiter("b", 1.0))  # would fit, but a FIFO queue keeps it behind "a"
        await asyncio.sleep(0.01)
        assert order == [] and len(gate.waiting) == 2
        with pytest.raises(Busy, match="queued"):
            await gate.acquire(1.0)  # the queue is full
        gate.release(6.0)
        await asyncio.gather(first, second)
        assert order == ["a", "b"] and gate.in_flight == pytest.approx(6.0)
        gate.release(5.0)
        gate.release(1.0)
        assert gate.in_flight == pytest.approx(0.0) and not gate.waiting

    asyncio.run(scenario())


def test_a_wait_that_times_out_or_is_cancelled_leaves_nothing_behind():
    async def scenario():
        gate = Admission(max_seconds=10.0, max_queue=4, timeout_seconds=0.05)
        await gate.acquire(10.0)
        with pytest.raises(Busy, match="waited"):
            await gate.acquire(1.0)
        assert not gate.waiting
        task = asyncio.create_task(gate.acquire(2.0))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away while queued
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not gate.waiting
        gate.release(10.0)
        assert gate.in_flight == 0.0

    asyncio.run(scenario())
