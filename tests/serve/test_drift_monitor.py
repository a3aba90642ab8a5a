"""The serving drift monitor: its value is the sliced W1 of exactly the last N files, recomputed on its
cadence (files or seconds) off the request path, one computation at a time, with files arriving from
many threads at once; its verdict waits for a full window; a bad reference is refused naming the option;
without a reference the service has no drift series and says it is off."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from posttrain.select.drift import SlicedReference
from posttrain.serve.drift import DriftMonitor, load_reference


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _monitor(clock: Clock, window_files: int = 20, every_files: int = 5, every_seconds: float = 30.0):
    reference = np.random.default_rng(0).standard_normal((200, 6))
    return DriftMonitor(SlicedReference(reference, projections=16), window_files=window_files, every_files=every_files,
                        every_seconds=every_seconds, clock=clock)


def test_the_value_covers_the_last_n_files_and_follows_its_cadence():
    clock = Clock()
    monitor = _monitor(clock)
    rows = np.random.default_rng(1).standard_normal((33, 6)).astype(np.float32) + 0.8
    try:
        for row in rows[:4]:
            monitor.add(row)
        monitor.wait()
        assert monitor.status()["value"] is None  # 4 files: neither 5 files nor 30 s yet
        monitor.add(rows[4])
        monitor.wait()
        status = monitor.status()
        assert status["window_files"] == 5 and status["value"] == pytest.approx(monitor.reference.w1(rows[:5]))
        assert status["drift"] is None  # the window (20) is not full: no verdict yet
        for row in rows[5:33]:  # past the window: the ring buffer keeps the last 20
            monitor.add(row)
            monitor.wait()
        status = monitor.status()
        assert status["computed_at_files"] == 30 and status["files_seen"] == 33
        assert status["value"] == pytest.approx(monitor.reference.w1(rows[10:30]))
        assert status["drift"] is True and status["value"] > status["threshold"]
        clock.now += 31  # time passes: a read starts the computation of the 3 files waiting
        monitor.status()
        monitor.wait()
        assert monitor.status()["value"] == pytest.approx(monitor.reference.w1(rows[13:33]))
        assert monitor.gauge("window_files") == 20.0
    finally:
        monitor.close()


def test_files_from_many_threads_are_all_counted_and_one_computation_runs_at_a_time():
    monitor = _monitor(Clock(), window_files=50, every_files=1)
    running, most = [0], [0]
    lock = threading.Lock()
    compute = monitor.reference.w1

    def counted(window):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return compute(window)
        finally:
            with lock:
                running[0] -= 1

    monitor.reference.w1 = counted
    rows = np.random.default_rng(2).standard_normal((8, 100, 6)).astype(np.float32)
    threads = [threading.Thread(target=lambda part=part: [monitor.add(row) for row in part]) for part in rows]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        monitor.wait()
        monitor.status()
        monitor.wait()
        status = monitor.status()
        assert status["files_seen"] == 800 and status["computed_at_files"] == 800 and most[0] == 1
    finally:
        monitor.close()


def test_no_threshold_for_a_reference_smaller_than_two_windows():
    monitor = _monitor(Clock(), window_files=150)
    try:
        assert monitor.threshold is None and math.isnan(monitor.gauge("threshold"))
    finally:
        monitor.close()


def test_a_reference_of_another_model_or_not_embeddings_is_refused(tmp_path):
    from conftest import write_embedding_set

    folder = write_embedding_set(tmp_path / "ref", np.zeros((4, 16), np.float32), [{"id": str(i)} for i in range(4)])
    with pytest.raises(ValueError, match=r"serve.drift_reference: .*16-dimensional embeddings, the served model's are 32"):
        load_reference(folder, 4.0, 32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "embeddings.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="serve.drift_reference: .*format/version"):
        load_reference(tmp_path / "bad", 4.0, 32)
    from posttrain.serve.config import ServeConfig

    with pytest.raises(ValueError, match="serve.drift_reference: .*not an embeddings folder"):
        ServeConfig(model="m", drift_reference=tmp_path)
    with pytest.raises(ValueError, match="serve.drift_window_files"):
        ServeConfig(model="m", drift_window_files=1)


def test_without_a_reference_drift_is_off():
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from posttrain.serve.app import drift
    from posttrain.serve.engine import Admission
    from posttrain.serve.metrics import Metrics

    state = SimpleNamespace(drift=None, drift_off_reason=None, admission=Admission(16000, 1, 1.0), batchers=[])
    assert b"posttrain_serve_drift" not in generate_latest(Metrics(state).registry)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=state)))
    status = asyncio.run(drift(request))
    assert status["enabled"] is False and "--drift-reference" in status["detail"]
