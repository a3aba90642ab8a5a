"""Receiving uploads for ``posttrain serve``: bodies streamed into the service's folder under a byte limit
per file, a read timeout (no byte for ``read_timeout_seconds``) and an upload deadline (the whole body
within ``upload_timeout_seconds``, so a trickle is cut too); whatever goes wrong, the partial file is
removed. Also the connection guard under uvicorn: a connection that sends no request within the read
timeout is closed, and beyond ``max_connections`` open ones a new connection is closed at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

RAW_TYPES = ("application/octet-stream", "application/ogg", "video/mp4", "video/webm", "video/ogg",
             "video/quicktime")


class RequestError(Exception):
    """A request the service refuses: HTTP status, one-word kind, one-line detail."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, " ".join(detail.split())


def is_audio_type(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind.startswith("audio/") or kind in RAW_TYPES


class Limits:
    """What one request may send: bytes per file, seconds between bytes, seconds for the whole body."""

    def __init__(self, max_file_bytes: int, read_timeout_s: float, upload_timeout_s: float):
        self.max_file_bytes, self.read_timeout_s = max_file_bytes, read_timeout_s
        self.deadline = time.monotonic() + upload_timeout_s
        self.upload_timeout_s = upload_timeout_s

    async def chunks(self, stream: AsyncIterator[bytes], limit: int, what: str) -> AsyncIterator[bytes]:
        """The body's chunks, refused as soon as more than ``limit`` bytes have come (413), or when it
        stalls or runs past the deadline (408)."""
        received = 0
        iterator = stream.__aiter__()
        while True:
            wait = min(self.read_timeout_s, self.deadline - time.monotonic())
            if wait <= 0:
                raise RequestError(408, "upload_timeout", f"{what}: not complete after {self.upload_timeout_s:g} s "
                                                          f"(the upload deadline)")
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), wait)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                if time.monotonic() >= self.deadline:
                    raise RequestError(408, "upload_timeout", f"{what}: not complete after "
                                                              f"{self.upload_timeout_s:g} s (the upload deadline)") from None
                raise RequestError(408, "read_timeout", f"{what}: no data for {self.read_timeout_s:g} s") from None
            received += len(chunk)
            if received > limit:
                raise RequestError(413, "too_large", f"{what}: more than {limit} bytes (the upload limit; "
                                                     f"raise --max-upload-mb to accept more)")
            yield chunk


def check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", f"upload of {declared} bytes; the limit is {limit} bytes")


async def receive_raw(request: Request, folder: Path, limits: Limits) -> Path:
    """The body of a raw upload, in a file of ``folder``."""
    check_declared_length(request, limits.max_file_bytes)
    handle, name = tempfile.mkstemp(dir=folder, suffix=".upload")
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            async for chunk in limits.chunks(request.stream(), limits.max_file_bytes, "upload"):
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if path.stat().st_size == 0:
        path.unlink()
        raise RequestError(400, "empty", "the request body is empty: send the audio bytes")
    return path


class _BoundedParser(MultiPartParser):
    """Starlette's multipart parser, refusing a file part as soon as it passes the per-file limit (the
    whole-body limit alone would let one file of a batch take every file's share)."""

    def __init__(self, *args, max_file_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_file_bytes, self._part_bytes = max_file_bytes, 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        if self._current_part.file is not None and self._part_bytes > self.max_file_bytes:
            name = Path(self._current_part.file.filename or "upload").name
            raise RequestError(413, "too_large", f"{name}: more than {self.max_file_bytes} bytes (the per-file "
                                                 f"upload limit; raise --max-upload-mb to accept more)")
        super().on_part_data(data, start, end)


async def receive_form(request: Request, folder: Path, limits: Limits, max_files: int,
                       fields: list[tuple[str, str]] | None = None) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file of a multipart body, copied into ``folder``; its text fields are
    appended to ``fields`` as ``(name, value)`` when given (else ignored)."""
    total = limits.max_file_bytes * max_files
    check_declared_length(request, total)
    parser = _BoundedParser(request.headers, limits.chunks(request.stream(), total, "multipart body"),
                            max_files=max_files, max_fields=8, max_file_bytes=limits.max_file_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError(400, "bad_form", f"multipart body: {error.message}") from None
    received: list[tuple[str, Path]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                if fields is not None:
                    fields.append((key, value))
                continue
            name = Path(value.filename or "upload").name
            if value.content_type and not is_audio_type(value.content_type):
                raise RequestError(415, "content_type", f"{name}: content type {value.content_type} is not audio")
            handle, path = tempfile.mkstemp(dir=folder, suffix=".upload")
            received.append((name, Path(path)))
            with os.fdopen(handle, "wb") as out:
                shutil.copyfileobj(value.file, out)
    except BaseException:
        remove(received)
        raise
    finally:
        await form.close()
    if not received:
        raise RequestError(400, "no_file", "multipart body without a file part")
    return received


def remove(received: list[tuple[str, Path]]) -> None:
    for _, path in received:
        path.unlink(missing_ok=True)


def guarded_protocol(read_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with two guards it lacks: a connection that has not sent a whole request
    line and headers ``read_timeout_s`` after it opened (or after its last response) is closed, and a
    connection beyond ``max_connections`` is closed as it opens."""

    class GuardedProtocol(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._request_timer = self.loop.call_later(read_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _expire(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is running: the app's own timeouts take over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedProtocol
