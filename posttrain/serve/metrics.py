"""The Prometheus series of ``posttrain serve``, in a registry of its own, with bounded labels: the
``endpoint`` label is a route of the app or ``other`` (never the raw path), and unauthenticated requests
only count in one unlabelled series, so a client cannot grow ``/metrics`` by calling random paths."""

from __future__ import annotations

from typing import Any

OTHER_ENDPOINT = "other"


class Metrics:
    def __init__(self, state: Any):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("posttrain_serve_requests", "HTTP requests by route and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("posttrain_serve_request_seconds", "request latency by route", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.unauthorized = Counter("posttrain_serve_unauthorized_requests",
                                    "requests refused for a missing or wrong token (any path)", registry=self.registry)
        self.errors = Counter("posttrain_serve_errors", "refused or failed files by kind", ["kind"],
                              registry=self.registry)
        self.audio = Counter("posttrain_serve_audio_seconds", "decoded audio seconds scored", registry=self.registry)
        self.passes = Counter("posttrain_serve_forward_passes", "forward passes on the device", registry=self.registry)
        self.windows = Counter("posttrain_serve_windows", "windows scored (windows / passes = the batch size)",
                               registry=self.registry)
        queue_depth = Gauge("posttrain_serve_queue_depth", "requests waiting for admission", registry=self.registry)
        queue_depth.set_function(lambda: len(state.admission.waiting))
        in_flight = Gauge("posttrain_serve_inflight_audio_seconds", "admitted audio seconds", registry=self.registry)
        in_flight.set_function(lambda: state.admission.in_flight_seconds)
        windows = Gauge("posttrain_serve_windows_queued", "windows waiting for the device", registry=self.registry)
        windows.set_function(lambda: sum(batcher.queued for batcher in state.batchers))
        if state.drift is not None:  # --drift-reference (posttrain.serve.drift); NaN until there is a value
            for name, key, text in (
                    ("posttrain_serve_drift_sliced_w1", "value",
                     "sliced Wasserstein-1 of the recent files' embeddings from the drift reference"),
                    ("posttrain_serve_drift_threshold", "threshold",
                     "95th percentile of that distance for a full window of reference data"),
                    ("posttrain_serve_drift_window_files", "window_files", "files behind the last drift value")):
                gauge = Gauge(name, text, registry=self.registry)
                gauge.set_function(lambda key=key: state.drift.gauge(key))

    def count_pass(self, windows: int) -> None:
        self.passes.inc()
        self.windows.inc(windows)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
