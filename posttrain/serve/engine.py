"""Admission control and dynamic batching on the device for ``posttrain serve``.

``Admission`` bounds the decoded audio the service holds: a request is admitted when its seconds fit
under ``max_inflight_seconds``; otherwise it waits in a queue of at most ``max_queue`` requests (and at
most ``queue_timeout_seconds``), beyond which it is refused with ``Busy`` (HTTP 503 + Retry-After).
``Batcher`` runs the model in one thread: windows of all admitted requests (cut by the one windowing
of ``posttrain.eval.scoring.WindowConfig``) join a forward pass until it holds ``max_batch_seconds``
padded audio seconds or ``max_batch_size`` windows, or ``max_batch_wait_ms`` has passed since its first
window arrived. Each window is normalised on its own as in ``posttrain.eval.inference.forward_windows``,
so a window scores the same alone or batched.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.eval.inference import forward_windows


class Busy(Exception):
    """The service holds as much audio as it may and its queue is full (or the wait ran out)."""


class Admission:
    """Audio seconds in flight, with a bounded FIFO queue of waiting requests (one event loop)."""

    def __init__(self, max_seconds: float, max_queue: int, timeout_seconds: float):
        self.max_seconds, self.max_queue, self.timeout_seconds = max_seconds, max_queue, timeout_seconds
        self.in_flight = 0.0
        self.waiting: list[tuple[float, asyncio.Future]] = []

    async def acquire(self, seconds: float) -> None:
        if not self.waiting and self.in_flight + seconds <= self.max_seconds:
            self.in_flight += seconds
            return
        if len(self.waiting) >= self.max_queue:
            raise Busy(f"{len(self.waiting)} requests queued (the limit); retry later")
        ticket = (seconds, asyncio.get_running_loop().create_future())
        self.waiting.append(ticket)
        try:
            await asyncio.wait_for(asyncio.shield(ticket[1]), self.timeout_seconds)
        except asyncio.TimeoutError:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
                raise Busy(f"waited {self.timeout_seconds:g} s for capacity; retry later") from None
            # admitted just as the wait ended: keep the seconds
        except asyncio.CancelledError:  # the client went away
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            else:
                self.release(seconds)
            raise

    def release(self, seconds: float) -> None:
        self.in_flight -= seconds
        while self.waiting and self.in_flight + self.waiting[0][0] <= self.max_seconds:
            seconds_next, ticket = self.waiting.pop(0)
            self.in_flight += seconds_next
            ticket.set_result(None)


@dataclass
class _Job:
    wave: np.ndarray
    future: Future


class Batcher:
    """One thread running every forward pass; ``submit`` returns a future per window ([2] logits)."""

    def __init__(self, model, device: torch.device, *, max_batch_seconds: float, max_batch_size: int,
                 max_wait_ms: float, precision: str = "fp32", on_pass: Callable[[int], None] = lambda windows: None):
        self.model, self.device, self.precision, self.on_pass = model, device, precision, on_pass
        self.max_samples = int(max_batch_seconds * SAMPLE_RATE_HZ)
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000.0
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="posttrain-serve-batcher", daemon=True)
        self.thread.start()

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def submit(self, waves: list[np.ndarray]) -> list[Future]:
        futures = []
        for wave in waves:
            job = _Job(wave, Future())
            self.jobs.put(job)
            futures.append(job.future)
        return futures

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` and the windows that join it, and the one that did not fit (it opens the next pass)."""
        batch, longest = [first], len(first.wave)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # closing: the run loop sees it after this pass
                break
            if max(longest, len(job.wave)) * (len(batch) + 1) > self.max_samples:  # padded seconds
                return batch, job
            batch.append(job)
            longest = max(longest, len(job.wave))
        return batch, None

    def _run(self) -> None:
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else self.jobs.get()
            if job is None:
                return
            batch, carry = self._gather(job)
            try:
                logits, _ = forward_windows(self.model, [j.wave for j in batch], self.device, self.precision)
            except Exception as error:  # noqa: BLE001 - a failed pass fails its requests, not the service
                for j in batch:
                    j.future.set_exception(error)
                continue
            self.on_pass(len(batch))
            for row, j in enumerate(batch):
                j.future.set_result(logits[row].astype(np.float64))
