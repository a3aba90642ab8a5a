"""Admission control and fair dynamic batching on the device for ``posttrain serve``.

``Admission`` bounds the decoded audio the service holds, counted in whole samples (integers: a float
sum of seconds drifts, and a gauge must never read below zero): a request is admitted when its samples
fit under the bound; otherwise it waits in a FIFO queue of at most ``max_queue`` requests (and at most
``timeout_seconds``), beyond which it is refused with ``Busy`` (HTTP 503 + Retry-After).

``Batcher`` runs the model in one thread. Each request's windows (cut by the one windowing of
``posttrain.eval.scoring.WindowConfig``) join a queue of their own; a forward pass takes windows from
the waiting requests in turn (round robin), until it holds ``max_batch_seconds`` padded audio seconds
or ``max_batch_size`` windows, or ``max_batch_wait_ms`` has passed since work arrived. So a short clip
waits for at most the pass running when it arrives, never for every window of the long files ahead of
it, and no request starves. Each window is normalised on its own as in
``posttrain.eval.inference.forward_windows``, so a window scores the same alone or batched; its pooled
embedding (the head's input, which that pass computes anyway) comes back with its logits, for the
service's drift monitor.
"""

from __future__ import annotations

import asyncio
import collections
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
    """Audio samples in flight, with a bounded FIFO queue of waiting requests (one event loop)."""

    def __init__(self, max_samples: int, max_queue: int, timeout_seconds: float):
        self.max_samples, self.max_queue, self.timeout_seconds = int(max_samples), max_queue, timeout_seconds
        self.in_flight = 0
        self.waiting: list[tuple[int, asyncio.Future]] = []

    async def acquire(self, samples: int) -> None:
        samples = int(samples)
        if not self.waiting and self.in_flight + samples <= self.max_samples:
            self.in_flight += samples
            return
        if len(self.waiting) >= self.max_queue:
            raise Busy(f"{len(self.waiting)} requests queued (the limit); retry later")
        ticket = (samples, asyncio.get_running_loop().create_future())
        self.waiting.append(ticket)
        try:
            await asyncio.wait_for(asyncio.shield(ticket[1]), self.timeout_seconds)
        except asyncio.TimeoutError:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
                raise Busy(f"waited {self.timeout_seconds:g} s for capacity; retry later") from None
            # admitted just as the wait ended: keep the samples
        except asyncio.CancelledError:  # the client went away
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            else:
                self.release(samples)
            raise

    def overdraw(self, samples: int) -> None:
        """Admit ``samples`` more at once, beyond the bound if need be: a file longer than its header said
        is already decoded (its decode was bounded by the per-file limit), so waiting would only hold it."""
        self.in_flight += int(samples)

    def release(self, samples: int) -> None:
        self.in_flight -= int(samples)
        if self.in_flight < 0:
            raise RuntimeError(f"admission released {-self.in_flight} samples more than it admitted")
        while self.waiting and self.in_flight + self.waiting[0][0] <= self.max_samples:
            samples_next, ticket = self.waiting.pop(0)
            self.in_flight += samples_next
            ticket.set_result(None)

    @property
    def in_flight_seconds(self) -> float:
        return self.in_flight / SAMPLE_RATE_HZ


@dataclass(eq=False)
class _Job:
    wave: np.ndarray
    future: Future


class Batcher:
    """One thread running every forward pass; ``submit`` takes one request's windows and returns a future
    per window (``([2] logits float64, [D] pooled embedding float32)``; the embedding is None for an ONNX
    export without one), in order."""

    def __init__(self, model, device: torch.device, *, max_batch_seconds: float, max_batch_size: int,
                 max_wait_ms: float, precision: str = "fp32", on_pass: Callable[[int], None] = lambda windows: None,
                 name: str = "batcher"):
        self.model, self.device, self.precision, self.on_pass = model, device, precision, on_pass
        self.max_samples = int(max_batch_seconds * SAMPLE_RATE_HZ)
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000.0
        self._requests: collections.deque[collections.deque[_Job]] = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self.thread = threading.Thread(target=self._run, name=f"posttrain-serve-{name}", daemon=True)
        self.thread.start()

    @property
    def queued(self) -> int:
        """Windows waiting for the device."""
        with self._ready:
            return sum(len(jobs) for jobs in self._requests)

    def submit(self, waves: list[np.ndarray]) -> list[Future]:
        jobs = collections.deque(_Job(wave, Future()) for wave in waves)
        futures = [job.future for job in jobs]
        with self._ready:
            if self._closing:
                raise RuntimeError("the service is shutting down")
            self._requests.append(jobs)
            self._ready.notify()
        return futures

    def close(self, timeout_s: float = 10.0) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        self.thread.join(timeout=timeout_s)

    def _take(self) -> list[_Job]:
        """Windows for one pass, one per waiting request in turn (called with the lock held)."""
        batch: list[_Job] = []
        longest = 0
        while self._requests and len(batch) < self.max_batch_size:
            jobs = self._requests[0]
            job = jobs[0]
            if batch and not job.future.cancelled() and max(longest, len(job.wave)) * (len(batch) + 1) > self.max_samples:
                break  # padded seconds: the pass is full
            jobs.popleft()
            if job.future.set_running_or_notify_cancel():  # False: its request was cancelled (client gone)
                batch.append(job)
                longest = max(longest, len(job.wave))
            self._requests.rotate(-1)  # the next request's turn (this one, if not done, goes to the back)
            if not jobs:
                self._requests.pop()
        return batch

    def _next_pass(self) -> list[_Job] | None:
        with self._ready:
            while not self._requests and not self._closing:
                self._ready.wait()
            if self._closing:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while (sum(len(jobs) for jobs in self._requests) < self.max_batch_size and not self._closing
                   and (remaining := deadline - time.monotonic()) > 0):
                self._ready.wait(remaining)
            return self._take()

    def _run(self) -> None:
        while (batch := self._next_pass()) is not None:
            if not batch:
                continue
            try:
                logits, pooled = forward_windows(self.model, [j.wave for j in batch], self.device, self.precision)
            except Exception as error:  # noqa: BLE001 - a failed pass fails its requests, not the service
                for j in batch:
                    j.future.set_exception(error)
                continue
            self.on_pass(len(batch))
            for row, j in enumerate(batch):
                j.future.set_result((logits[row].astype(np.float64), None if pooled is None else pooled[row]))
        with self._ready:  # closing: what still waits fails now rather than hang its request
            for jobs in self._requests:
                for job in jobs:
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(RuntimeError("the service shut down"))
            self._requests.clear()
