"""The HTTP service of ``posttrain serve`` (FastAPI on uvicorn; the OpenAPI schema at ``/openapi.json``).

Endpoints
    ``POST /v1/score``        one upload: raw audio bytes (``audio/*``, ``video/mp4|webm|ogg``,
                              ``application/octet-stream``) or ``multipart/form-data`` with one file
                              -> file score, P(real), calibrated probability, decision, timeline
    ``POST /v1/score/batch``  ``multipart/form-data`` with up to ``max_batch_files`` files -> one
                              result or one error per file, in upload order
    ``GET /healthz``          the process answers; ``GET /readyz``: the model is loaded and its thread runs
    ``GET /metrics``          Prometheus: requests, latency, queue depth, audio in flight, errors by kind
    ``GET /``                 a page to drop or record a file and see verdict, probability and timeline

A request's life: the body streams into a file in the service's own temporary folder, refused (413)
as soon as it passes ``max_upload_bytes``; its duration is read from the container header and refused
(413) above ``max_upload_seconds`` before any decoding; it waits for admission (``engine.Admission``,
503 + Retry-After when the queue is full); it is decoded (corrupt, truncated, near-silent or too-short
audio: 422), windowed and scored by the batcher; its file is removed whatever happened. Every refusal is
a 4xx/503 with ``{"error": kind, "detail": one line}`` and the service goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.eval.inference import SampleOutput, min_input_samples
from posttrain.eval.scoring import NEAR_SILENT_DBFS, Decision, WindowConfig, aggregate, logit_diff, p_real
from posttrain.eval.timeline import timeline_of
from posttrain.serve.config import ServeConfig
from posttrain.serve.engine import Admission, Batcher, Busy

RAW_TYPES = ("application/octet-stream", "application/ogg", "video/mp4", "video/webm", "video/ogg",
             "video/quicktime")
OPEN_PATHS = ("/", "/healthz", "/readyz")  # no token needed: nothing of a request or the model is in them
CHUNK_BYTES = 64 * 1024


class RequestError(Exception):
    """A request the service refuses: HTTP status, one-word kind, one-line detail."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, " ".join(detail.split())


def is_audio_type(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind.startswith("audio/") or kind in RAW_TYPES


class Metrics:
    """The service's Prometheus series, in a registry of its own."""

    def __init__(self, state: "ServiceState"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("posttrain_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("posttrain_serve_request_seconds", "request latency", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.errors = Counter("posttrain_serve_errors", "refused or failed files by kind", ["kind"],
                              registry=self.registry)
        self.audio = Counter("posttrain_serve_audio_seconds", "decoded audio seconds scored", registry=self.registry)
        self.passes = Counter("posttrain_serve_forward_passes", "forward passes on the device", registry=self.registry)
        self.windows = Counter("posttrain_serve_windows", "windows scored (windows / passes = the batch size)",
                               registry=self.registry)
        queue_depth = Gauge("posttrain_serve_queue_depth", "requests waiting for admission", registry=self.registry)
        queue_depth.set_function(lambda: len(state.admission.waiting))
        in_flight = Gauge("posttrain_serve_inflight_audio_seconds", "admitted audio seconds", registry=self.registry)
        in_flight.set_function(lambda: state.admission.in_flight)
        windows = Gauge("posttrain_serve_windows_queued", "windows waiting for the device", registry=self.registry)
        windows.set_function(lambda: state.batcher.queued)


class ServiceState:
    """Everything a running service holds: model, limits, temporary space, batcher, metrics."""

    def __init__(self, cfg: ServeConfig, model, identity: dict[str, Any], device):
        from posttrain.eval.scoring import resolve_calibration

        self.cfg, self.model, self.identity = cfg, model, identity
        self.calibration, self.calibration_source = resolve_calibration(cfg.calibration, identity)
        self.decision = Decision.of(self.calibration)
        self.window = WindowConfig(cfg.window_seconds, cfg.hop_seconds, cfg.min_tail_seconds)
        self.min_samples = min_input_samples(model)
        self.admission = Admission(cfg.max_inflight_seconds, cfg.max_queue, cfg.queue_timeout_seconds)
        self.metrics = Metrics(self)
        self.batcher = Batcher(model, device, max_batch_seconds=cfg.max_batch_seconds,
                               max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_batch_wait_ms,
                               precision=cfg.precision, on_pass=self._count_pass)
        self.temp = Path(tempfile.mkdtemp(prefix="posttrain-serve-", dir=cfg.temp_dir))
        # the decoders' own temporary files (ffmpeg input copies) and multipart spooling land here too
        tempfile.tempdir = str(self.temp)
        self.closing = False

    def _count_pass(self, windows: int) -> None:
        self.metrics.passes.inc()
        self.metrics.windows.inc(windows)

    def close(self) -> None:
        self.closing = True
        self.batcher.close()
        shutil.rmtree(self.temp, ignore_errors=True)

    # ------------------------------------------------------------------------------ one file

    async def score_file(self, path: Path, name: str) -> dict[str, Any]:
        """The result of one received file (removed by the caller); ``RequestError`` when refused."""
        seconds, exact = await anyio.to_thread.run_sync(_probe, path, name)
        limit = self.cfg.max_upload_seconds
        if seconds > limit:
            raise RequestError(413, "too_long", f"{name}: {seconds:.1f} s of audio; this service scores at most "
                                                f"{limit:g} s per file (cut it, or raise --max-upload-seconds)")
        admitted = max(seconds, 1.0 / SAMPLE_RATE_HZ)
        try:
            await self.admission.acquire(admitted)
        except Busy as error:
            raise RequestError(503, "busy", f"service busy: {error}") from None
        try:
            wave, level = await anyio.to_thread.run_sync(_decode, path, name, seconds if exact else None, limit)
            return await self._score_wave(wave, level, name)
        finally:
            self.admission.release(admitted)

    async def _score_wave(self, wave: np.ndarray, level: float, name: str) -> dict[str, Any]:
        if level < NEAR_SILENT_DBFS:
            raise RequestError(422, "near_silent", f"{name}: near-silent input ({level:.0f} dBFS RMS, below "
                                                   f"{NEAR_SILENT_DBFS:g}): its score would say nothing")
        if len(wave) < self.min_samples:
            raise RequestError(422, "too_short", f"{name}: {len(wave) / SAMPLE_RATE_HZ:.3f} s; the model needs "
                                                 f"at least {self.min_samples / SAMPLE_RATE_HZ:.3f} s")
        spans = self.window.spans(len(wave))
        futures = self.batcher.submit([wave[start:stop] for start, stop in spans])
        window_logits = np.stack(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        lengths = np.array([stop - start for start, stop in spans])
        logits, _ = aggregate(lengths, window_logits, None, self.cfg.aggregation)
        output = SampleOutput(0, name, {}, logits, None, len(spans), len(wave), tuple(spans), window_logits)
        self.metrics.audio.inc(output.seconds)
        return self._result(output, level)

    def _result(self, output: SampleOutput, level: float) -> dict[str, Any]:
        score = float(logit_diff(output.logits))
        llr = probability = None
        if self.calibration is not None:
            llr = float(self.calibration.llr([score])[0])
            prior = self.calibration.prior_bona_fide
            probability = 1.0 / (1.0 + math.exp(-(llr + math.log(prior / (1.0 - prior)))))
        return {"file": output.id, "seconds": output.seconds, "windows": output.num_windows,
                "logit_diff": score, "p_real": float(p_real(output.logits)), "llr": llr,
                "probability_real_calibrated": probability, "decision": self.decision.label(score),
                "level_dbfs": level, "timeline": timeline_of(output, self.decision, self.calibration).to_dict()}


def _probe(path: Path, name: str) -> tuple[float, bool]:
    try:
        return audio.probe_seconds(path)
    except audio.AudioError as error:
        raise RequestError(422, error.reason, error.detail.replace(path.name, name)) from None


def _decode(path: Path, name: str, declared_seconds: float | None, max_seconds: float) -> tuple[np.ndarray, float]:
    """16 kHz mono samples and their level; a file shorter than its (exact) header says is truncated, one
    longer than the limit (a compressed file whose header understated its length) is refused."""
    try:
        waveform = audio.load(path, sample_rate_hz=SAMPLE_RATE_HZ)
    except audio.AudioError as error:
        raise RequestError(422, error.reason, error.detail.replace(str(path), name)) from None
    except Exception as error:  # noqa: BLE001 - a decoder crash on a hostile file is that file's problem
        raise RequestError(422, "unreadable", f"{name}: cannot be decoded ({type(error).__name__})") from None
    if declared_seconds is not None and waveform.seconds < declared_seconds - 0.05:
        raise RequestError(422, "truncated", f"{name}: truncated ({waveform.seconds:.2f} s decoded of the "
                                             f"{declared_seconds:.2f} s its header declares)")
    if waveform.seconds > max_seconds:
        raise RequestError(413, "too_long", f"{name}: {waveform.seconds:.1f} s decoded (its header said less); "
                                            f"this service scores at most {max_seconds:g} s per file")
    return waveform.samples, audio.level_dbfs(waveform.samples)


# ---------------------------------------------------------------------------------- receiving


async def _limited(stream: AsyncIterator[bytes], limit: int, what: str) -> AsyncIterator[bytes]:
    """The body's chunks, refused (413) as soon as more than ``limit`` bytes have come."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise RequestError(413, "too_large", f"{what}: more than {limit} bytes (the upload limit; "
                                                 f"raise --max-upload-mb to accept more)")
        yield chunk


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", f"upload of {declared} bytes; the limit is {limit} bytes")


async def _receive_raw(request: Request, state: ServiceState) -> Path:
    limit = state.cfg.max_upload_bytes
    _check_declared_length(request, limit)
    handle, name = tempfile.mkstemp(dir=state.temp, suffix=".upload")
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            async for chunk in _limited(request.stream(), limit, "upload"):
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if path.stat().st_size == 0:
        path.unlink()
        raise RequestError(400, "empty", "the request body is empty: send the audio bytes")
    return path


async def _receive_form(request: Request, state: ServiceState, max_files: int) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file of a multipart body, copied into the service's temporary space."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    total = state.cfg.max_upload_bytes * max_files
    _check_declared_length(request, total)
    parser = MultiPartParser(request.headers, _limited(request.stream(), total, "multipart body"),
                             max_files=max_files, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError(400, "bad_form", f"multipart body: {error.message}") from None
    received: list[tuple[str, Path]] = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, str):
                continue
            name = Path(value.filename or "upload").name
            if value.content_type and not is_audio_type(value.content_type):
                raise RequestError(415, "content_type", f"{name}: content type {value.content_type} is not audio")
            if value.size is not None and value.size > state.cfg.max_upload_bytes:
                raise RequestError(413, "too_large", f"{name}: {value.size} bytes; the limit is "
                                                     f"{state.cfg.max_upload_bytes} bytes per file")
            handle, path = tempfile.mkstemp(dir=state.temp, suffix=".upload")
            received.append((name, Path(path)))
            with os.fdopen(handle, "wb") as out:
                shutil.copyfileobj(value.file, out)
    except BaseException:
        _remove(received)
        raise
    finally:
        await form.close()
    if not received:
        raise RequestError(400, "no_file", "multipart body without a file part")
    return received


def _remove(received: list[tuple[str, Path]]) -> None:
    for _, path in received:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- the app


def create_app(cfg: ServeConfig, model, identity: dict[str, Any], device) -> FastAPI:
    """The service around a loaded model; its state is created at startup and torn down at exit."""
    from posttrain.serve.page import PAGE_HTML

    holder: dict[str, ServiceState] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        holder["state"] = ServiceState(cfg, model, identity, device)
        try:
            yield
        finally:
            holder.pop("state").close()

    app = FastAPI(title="posttrain serve", version="1", lifespan=lifespan,
                  description="Speech deepfake detection: file score, calibrated probability and timeline.")

    def state() -> ServiceState:
        return holder["state"]

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return _refusal(state(), error)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        endpoint = request.url.path
        try:
            if cfg.tokens and endpoint not in OPEN_PATHS and not _authorised(request, cfg.tokens):
                raise RequestError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is needed")
            response = await call_next(request)
        except RequestError as error:
            response = _refusal(state(), error)
        except Exception as error:  # noqa: BLE001 - a bug answers 500 and the service goes on
            state().metrics.errors.labels("internal").inc()
            response = JSONResponse({"error": "internal", "detail": type(error).__name__}, status_code=500)
        metrics = state().metrics
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.post("/v1/score", summary="Score one upload (raw audio bytes, or multipart with one file)")
    async def score(request: Request) -> dict[str, Any]:
        service = state()
        kind = request.headers.get("content-type", "")
        if kind.lower().startswith("multipart/form-data"):
            received = await _receive_form(request, service, 1)
        elif is_audio_type(kind):
            name = Path(request.headers.get("x-filename", "upload")).name or "upload"
            received = [(name, await _receive_raw(request, service))]
        else:
            raise RequestError(415, "content_type", f"content type {kind or '(none)'} is not audio: send audio/* or "
                                                    f"application/octet-stream bytes, or multipart/form-data")
        try:
            return await service.score_file(received[0][1], received[0][0])
        finally:
            _remove(received)

    @app.post("/v1/score/batch", summary="Score several files (multipart/form-data); one result or error each")
    async def score_batch(request: Request) -> dict[str, Any]:
        service = state()
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise RequestError(415, "content_type", "a batch is multipart/form-data with one file part per file")
        received = await _receive_form(request, service, service.cfg.max_batch_files)
        try:
            results = await asyncio.gather(*(_one_of_batch(service, path, name) for name, path in received))
        finally:
            _remove(received)
        return {"results": results}

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and its device thread runs")
    async def readyz() -> Response:
        service = holder.get("state")
        ready = service is not None and not service.closing and service.batcher.thread.is_alive()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", summary="The model served, its decision rule and the service's limits")
    async def model_info() -> dict[str, Any]:
        service = state()
        return {"model": service.identity.get("loaded_from"), "decision_rule": service.decision.rule,
                "threshold_logit_diff": service.decision.threshold, "calibration_source": service.calibration_source,
                "window_seconds": cfg.window_seconds, "hop_seconds": cfg.hop_seconds,
                "max_upload_bytes": cfg.max_upload_bytes, "max_upload_seconds": cfg.max_upload_seconds}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    return app


async def _one_of_batch(service: ServiceState, path: Path, name: str) -> dict[str, Any]:
    try:
        return {"ok": True, **await service.score_file(path, name)}
    except RequestError as error:
        service.metrics.errors.labels(error.kind).inc()
        return {"ok": False, "file": name, "status": error.status, "error": error.kind, "detail": error.detail}


def _authorised(request: Request, tokens: tuple[str, ...]) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return any(hmac.compare_digest(given.strip().encode(), token.encode()) for token in tokens)


def _refusal(service: ServiceState, error: RequestError) -> JSONResponse:
    service.metrics.errors.labels(error.kind).inc()
    headers = {"Retry-After": str(service.cfg.retry_after_seconds)} if error.status == 503 else None
    if error.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": error.kind, "detail": error.detail}, status_code=error.status, headers=headers)
