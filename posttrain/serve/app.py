"""The HTTP service of ``posttrain serve`` (FastAPI on uvicorn; the OpenAPI schema at ``/openapi.json``).

Endpoints
    ``POST /v1/score``        one upload: raw audio bytes (``audio/*``, ``video/mp4|webm|ogg``,
                              ``application/octet-stream``) or ``multipart/form-data`` with one file
                              -> file score, P(real), calibrated probability, decision, timeline, warnings;
                              options ``start_seconds``, ``end_seconds``, ``window_seconds`` (query or
                              form fields: ``posttrain.serve.options``)
    ``POST /v1/score/batch``  ``multipart/form-data`` with up to ``max_batch_files`` files -> one
                              result or one error per file, in upload order
    ``GET /healthz``          the process answers; ``GET /readyz``: the model is loaded and its thread runs
    ``GET /metrics``          Prometheus: requests, latency, queue depth, audio in flight, errors by kind
    ``GET /v1/model``         the model, its decision rule and the service's limits
    ``GET /v1/drift``         with ``--drift-reference``: the recent files' drift from the reference
                              (``posttrain.serve.drift``); else ``{"enabled": false}`` and why
    ``GET /``                 a page to drop or record a file and see verdict, probability and timeline

The state lives on ``app.state.service`` (``posttrain.serve.service.ServiceState``), created at startup
and torn down at exit; routes are in two routers (``api``, ``probes``). Every answer that is not a
result has the shape ``{"error": kind, "detail": one line}``, 404 and 405 included. A token is only
accepted in the ``Authorization`` header: one in the query string is refused (URLs end up in logs), and
the service's own access log never writes a query string.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.select.drift import SlicedReference
from posttrain.serve.config import ServeConfig
from posttrain.serve.metrics import OTHER_ENDPOINT
from posttrain.serve.options import OPENAPI_PARAMETERS, ScoreOptions
from posttrain.serve.receive import (Limits, RequestError, guarded_protocol, is_audio_type, receive_form,
                                     receive_raw, remove)
from posttrain.serve.service import ServiceState

log = logging.getLogger("posttrain.serve")
access_log = logging.getLogger("posttrain.serve.access")

OPEN_PATHS = ("/", "/healthz", "/readyz")  # no token needed: nothing of a request or the model is in them
TOKEN_QUERY_KEYS = ("token", "access_token", "api_key", "apikey", "key", "auth", "authorization", "bearer")
_HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}

api = APIRouter()
probes = APIRouter()


def _service(request: Request) -> ServiceState:
    return request.app.state.service


def _limits(service: ServiceState) -> Limits:
    cfg = service.cfg
    return Limits(cfg.max_upload_bytes, cfg.read_timeout_seconds, cfg.upload_timeout_seconds)


@api.post("/v1/score", summary="Score one upload (raw audio bytes, or multipart with one file)",
          openapi_extra={"parameters": OPENAPI_PARAMETERS})
async def score(request: Request) -> dict[str, Any]:
    service = _service(request)
    query = request.query_params.multi_items()
    ScoreOptions.parse(query).check_window(service.window_bounds())  # a bad URL option costs no upload
    fields: list[tuple[str, str]] = []
    kind = request.headers.get("content-type", "")
    if kind.lower().startswith("multipart/form-data"):
        received = await receive_form(request, service.temp, _limits(service), 1, fields)
    elif is_audio_type(kind):
        name = Path(request.headers.get("x-filename", "upload")).name or "upload"
        received = [(name, await receive_raw(request, service.temp, _limits(service)))]
    else:
        raise RequestError(415, "content_type", f"content type {kind or '(none)'} is not audio: send audio/* or "
                                                f"application/octet-stream bytes, or multipart/form-data")
    try:
        return await service.score_file(received[0][1], received[0][0], ScoreOptions.parse(query, fields))
    finally:
        remove(received)


@api.post("/v1/score/batch", summary="Score several files (multipart/form-data); one result or error each")
async def score_batch(request: Request) -> dict[str, Any]:
    service = _service(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise RequestError(415, "content_type", "a batch is multipart/form-data with one file part per file")
    received = await receive_form(request, service.temp, _limits(service), service.cfg.max_batch_files)
    try:
        results = await asyncio.gather(*(_one_of_batch(service, path, name) for name, path in received))
    finally:
        remove(received)
    return {"results": results}


async def _one_of_batch(service: ServiceState, path: Path, name: str) -> dict[str, Any]:
    try:
        return {"ok": True, **await service.score_file(path, name)}
    except RequestError as error:
        service.metrics.errors.labels(error.kind).inc()
        return {"ok": False, "file": name, "status": error.status, "error": error.kind, "detail": error.detail}


@api.get("/v1/model", summary="The model served, its decision rule and the service's limits")
async def model_info(request: Request) -> dict[str, Any]:
    service = _service(request)
    cfg = service.cfg
    return {"model": service.identity.get("loaded_from"), "decision_rule": service.decision.rule,
            "score_definition": service.scoring.name, service.decision.threshold_key: service.decision.threshold,
            "calibration_source": service.calibration_source,
            "window_seconds": cfg.window_seconds, "hop_seconds": cfg.hop_seconds,
            "request_window_bounds_seconds": list(service.window_bounds()),
            "max_upload_bytes": cfg.max_upload_bytes, "max_upload_seconds": cfg.max_upload_seconds}


@api.get("/v1/drift", summary="The drift of the recent files' embeddings from the reference set")
async def drift(request: Request) -> dict[str, Any]:
    service = _service(request)
    if service.drift is None:
        return {"enabled": False,
                "detail": service.drift_off_reason or "start the service with --drift-reference to monitor drift"}
    return service.drift.status()


@api.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@probes.get("/healthz", summary="The process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", summary="The model is loaded and its device thread runs")
async def readyz(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    ready = service is not None and not service.closing and all(b.thread.is_alive() for b in service.batchers)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@probes.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    from posttrain.serve.page import PAGE_HTML

    return HTMLResponse(PAGE_HTML)


def _error_response(service: ServiceState | None, status: int, kind: str, detail: str) -> JSONResponse:
    if service is not None:
        service.metrics.errors.labels(kind).inc()
    headers = None
    if status == 503 and service is not None:
        headers = {"Retry-After": str(service.cfg.retry_after_seconds)}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": kind, "detail": " ".join(str(detail).split())}, status_code=status, headers=headers)


def _authorised(request: Request, tokens: tuple[str, ...]) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return any(hmac.compare_digest(given.strip().encode(), token.encode()) for token in tokens)


def create_app(cfg: ServeConfig, model, identity: dict[str, Any], device,
               drift_reference: SlicedReference | None = None) -> FastAPI:
    """The service around a loaded model (and the drift reference, ``posttrain.serve.drift.load_reference``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = ServiceState(cfg, model, identity, device, drift_reference)
        try:
            yield
        finally:
            app.state.service.close()

    app = FastAPI(title="posttrain serve", version="1", lifespan=lifespan,
                  description="Speech deepfake detection: file score, calibrated probability and timeline.")
    app.include_router(api)
    app.include_router(probes)
    routes = frozenset(path for router in (api, probes) for path in (route.path for route in router.routes))

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return _error_response(getattr(request.app.state, "service", None), error.status, error.kind, error.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(error.status_code, "http_error")
        return _error_response(getattr(request.app.state, "service", None), error.status_code, kind, error.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(getattr(request.app.state, "service", None), 422, "invalid_request",
                               "; ".join(str(e.get("msg", e)) for e in error.errors()))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        service: ServiceState = request.app.state.service
        path = request.url.path
        endpoint = path if path in routes else OTHER_ENDPOINT
        try:
            if any(key.lower() in TOKEN_QUERY_KEYS for key in request.query_params):
                raise RequestError(400, "token_in_query", "a token is only accepted in the 'Authorization: Bearer "
                                                          "<token>' header, never in the URL (URLs end up in logs)")
            if cfg.tokens and path not in OPEN_PATHS and not _authorised(request, cfg.tokens):
                service.metrics.unauthorized.inc()  # one series for any path: random paths add none
                response = _error_response(None, 401, "unauthorized",
                                           "a valid 'Authorization: Bearer <token>' header is needed")
                _log_access(request, endpoint, 401, started)
                return response
            response = await call_next(request)
        except RequestError as error:
            response = _error_response(service, error.status, error.kind, error.detail)
        except Exception as error:  # noqa: BLE001 - a bug answers 500 and the service goes on
            log.exception("internal error on %s %s", request.method, endpoint)
            response = _error_response(service, 500, "internal", type(error).__name__)
        service.metrics.observe(endpoint, response.status_code, time.perf_counter() - started)
        _log_access(request, endpoint, response.status_code, started)
        return response

    return app


def _log_access(request: Request, endpoint: str, status: int, started: float) -> None:
    """One line per request: client, method, route (never the query string or a header), status, time."""
    client = request.client.host if request.client else "-"
    access_log.info("%s %s %s %d %.1f ms", client, request.method, endpoint, status,
                    (time.perf_counter() - started) * 1000)


def serve(cfg: ServeConfig) -> int:
    """Load the model (``cfg.backend``: torch, or an ONNX export run by onnxruntime on the CPU) and run the
    service until SIGTERM/SIGINT (then at most ``shutdown_timeout_seconds``)."""
    import torch
    import uvicorn

    from posttrain.loading import load_scorer
    from posttrain.serve.drift import load_reference
    from posttrain.serve.service import lane_threads

    logging.getLogger("posttrain").setLevel(cfg.log_level.upper())  # the console set-up is posttrain.console's
    device = torch.device(cfg.device)
    # onnxruntime: one session serves both lanes; its intra-op threads are one lane's share, as torch's will be
    model, identity = load_scorer(cfg.model, device, backend=cfg.backend, threads=lane_threads(cfg))
    drift_reference = None if cfg.drift_reference is None else load_reference(
        cfg.drift_reference, cfg.window_seconds, int(model.ssl_config.hidden_size))
    auth = f"{len(cfg.tokens)} bearer token(s)" if cfg.tokens else "no authentication"
    backend = "" if cfg.backend == "torch" else f" ({cfg.backend})"
    print(f"posttrain serve: {cfg.model}{backend} on http://{cfg.host}:{cfg.port} ({auth}; page at /, API at /docs)",
          flush=True)
    config = uvicorn.Config(create_app(cfg, model, identity, device, drift_reference), host=cfg.host, port=cfg.port,
                            log_level=cfg.log_level, access_log=False,
                            http=guarded_protocol(cfg.read_timeout_seconds, cfg.max_connections),
                            timeout_graceful_shutdown=max(1, round(cfg.shutdown_timeout_seconds)),
                            timeout_keep_alive=max(1, round(min(5.0, cfg.read_timeout_seconds))))
    uvicorn.Server(config).run()
    return 0
