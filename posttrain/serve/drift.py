"""The rolling drift of ``posttrain serve``: how far the embeddings of the most recent files have moved
from a reference set (``--drift-reference``, an embeddings folder), as the sliced Wasserstein-1
distance on a fixed set of random directions (``posttrain.select.drift.SlicedReference``).

Each scored file's pooled embedding comes from the scoring forward pass itself (``engine.Batcher``
returns it beside the logits; aggregated over windows like the logits) and enters a ring buffer of the
last ``drift_window_files`` files. The value is recomputed in a thread of its own, never in a request's
path: once ``drift_every_files`` new files have arrived, or ``drift_every_seconds`` after the last
computation when any new file has (checked on every file and every read, e.g. a Prometheus scrape),
one computation at a time. Its threshold, fixed at start, is the 95th percentile of the same distance
between ``drift_window_files`` reference embeddings drawn at random and the rest of the reference: the
value a full window of data like the reference stays below (none when the reference holds fewer than
two windows). Files arrive from the event loop and from batch requests at once: a lock guards the
buffer and the results.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from posttrain.select.drift import SlicedReference, subsample
from posttrain.select.embeddings import EmbeddingsError, load_embeddings, read_manifest

log = logging.getLogger("posttrain.serve")

PROJECTIONS = 64  # random directions: the value's spread over direction sets is well below its drift signal
REFERENCE_ROWS = 10_000  # a larger reference is subsampled (seeded): each computation sorts reference + window
SEED = 0


def load_reference(path: Path, window_seconds: float, dim: int) -> SlicedReference:
    """The reference of ``--drift-reference``, checked against the served model's embedding size;
    ``ValueError`` naming the option when it does not fit."""
    try:
        rows, _ = load_embeddings(path)
        manifest = read_manifest(path)
    except EmbeddingsError as error:
        raise ValueError(f"serve.drift_reference: {error}") from None
    if rows.shape[1] != dim:
        raise ValueError(f"serve.drift_reference: {path}: {rows.shape[1]}-dimensional embeddings, the served model's "
                         f"are {dim}-dimensional: embed the reference with the served model")
    if len(rows) < 2:
        raise ValueError(f"serve.drift_reference: {path}: {len(rows)} embedding(s); at least 2 are needed")
    embedded_with = (manifest.get("inference") or {}).get("window_seconds")
    if embedded_with is not None and embedded_with != window_seconds:
        log.warning("drift reference %s was embedded in %g s windows, this service scores %g s windows: embeddings "
                    "of long files differ by that alone (embed the reference with --window-seconds %g)",
                    path, embedded_with, window_seconds, window_seconds)
    return SlicedReference(subsample(rows, REFERENCE_ROWS, np.random.default_rng(SEED)), PROJECTIONS, SEED)


class DriftMonitor:
    """A ring buffer of the last ``window_files`` file embeddings and their sliced W1 from ``reference``."""

    def __init__(self, reference: SlicedReference, *, window_files: int, every_files: int, every_seconds: float,
                 clock: Callable[[], float] = time.monotonic):
        self.reference, self.window_files = reference, window_files
        self.every_files, self.every_seconds, self.clock = every_files, every_seconds, clock
        self.threshold = reference.null_threshold(window_files)
        self._buffer = np.zeros((window_files, reference.dim), dtype=np.float32)
        self._lock = threading.Lock()
        self._seen = 0  # files ever added (the next one goes to row seen % window_files)
        self._pending = 0  # files added since the last computation started
        self._last_started = clock()
        self._running = False
        self._result: dict[str, Any] = {"value": None, "window_files": 0, "computed_at_files": 0}
        self._computations = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-serve-drift")

    def add(self, embedding: np.ndarray) -> None:
        with self._lock:
            self._buffer[self._seen % self.window_files] = embedding
            self._seen += 1
            self._pending += 1
        self.refresh()

    def refresh(self) -> None:
        """Start a computation in the worker if one is due and none runs."""
        with self._lock:
            now = self.clock()
            waited = now - self._last_started >= self.every_seconds
            due = self._pending >= self.every_files or (self._pending > 0 and waited)
            if not due or self._running:
                return
            window = self._buffer[: min(self._seen, self.window_files)].copy()
            self._running, self._pending, self._last_started = True, 0, now
            seen = self._seen
        self._worker.submit(self._compute, window, seen)

    def _compute(self, window: np.ndarray, seen: int) -> None:
        try:
            value = self.reference.w1(window)
        except Exception:  # noqa: BLE001 - a failed computation leaves the last value, never the service
            log.exception("drift computation failed")
            value = None
        with self._lock:
            if value is not None:
                self._result = {"value": value, "window_files": len(window), "computed_at_files": seen}
                self._computations += 1
            self._running = False

    def wait(self, timeout_s: float = 10.0) -> None:
        """Until the computation started so far is done (tests, shutdown)."""
        self._worker.submit(lambda: None).result(timeout=timeout_s)

    def status(self) -> dict[str, Any]:
        """The last value and what it covers (a read also starts a computation that is due)."""
        self.refresh()
        with self._lock:
            result, seen, computations = dict(self._result), self._seen, self._computations
        # a verdict only for a full window: the threshold is that of a full window
        full = result["window_files"] == self.window_files
        drift = result["value"] > self.threshold if full and self.threshold is not None else None
        return {"enabled": True, "distance": "sliced_w1", **result, "window_capacity_files": self.window_files,
                "threshold": self.threshold, "drift": drift, "files_seen": seen, "computations": computations,
                "reference_rows": self.reference.rows, "projections": PROJECTIONS}

    def gauge(self, key: str) -> float:
        """A status value for Prometheus (NaN when there is none yet)."""
        value = self.status()[key]
        return math.nan if value is None else float(value)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
