"""Where a shard set lives, and reading its files from there with retries.

A shard set's location is one of:

- a local folder: ``/data/shards/train`` (or ``file:///data/shards/train``);
- a URL any fsspec filesystem reads: ``https://host/shards/train``, ``s3://bucket/shards/train``,
  ``gs://bucket/shards/train`` (s3fs / gcsfs installed), its files at ``<location>/<name>``;
- a ``pipe:`` command as WebDataset users write them, with ``{name}`` where the file name goes:
  ``pipe:curl -sfL https://host/shards/train/{name}``, ``pipe:aws s3 cp s3://bucket/train/{name} -``.
  The command's standard output is the file.

Reading a shard is a byte stream of known length (``index.json`` lists each tar's bytes). A dropped
connection, a timeout, a failed command or a stream that ends early is retried with exponential
back-off: an fsspec file is re-opened at the byte where it broke; a ``pipe:`` command is run again
and the bytes already delivered are skipped. The tar reader above sees one unbroken stream, so every
sample is delivered exactly once. ``attempts`` failures in a row without progress, or an error no
retry can mend (a missing file, a server without byte ranges), raise ``ShardReadError`` naming the
file (and the byte).
"""

from __future__ import annotations

import io
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PIPE_PREFIX = "pipe:"
NAME_FIELD = "{name}"


class ShardReadError(OSError):
    """A shard file that could not be read after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` consecutive failures allowed per file; waits ``backoff_seconds x 2^k``, at most
    ``max_backoff_seconds``; ``timeout_seconds`` without a byte ends an HTTP connection."""

    attempts: int = 8
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0
    timeout_seconds: float = 60.0  # a connection silent for this long counts as dropped

    def wait(self, failures: int) -> float:
        return min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (failures - 1))


def is_pipe(location: str) -> bool:
    return str(location).startswith(PIPE_PREFIX)


def is_url(location: str) -> bool:
    """An fsspec URL (``scheme://...``) other than a local ``file://`` one."""
    scheme, separator, _ = str(location).partition("://")
    return bool(separator) and scheme != "file" and "/" not in scheme and not is_pipe(location)


def is_local(location: str) -> bool:
    return not is_pipe(location) and not is_url(location)


def local_path(location: str) -> Path:
    location = str(location)
    return Path(location[len("file://"):] if location.startswith("file://") else location)


def join(location: str, name: str) -> str:
    """The location of file ``name`` of a shard set."""
    location = str(location)
    if is_pipe(location):
        if NAME_FIELD not in location:
            raise ValueError(f"{location!r}: a pipe: shard set needs {NAME_FIELD} where the file name goes, "
                             f"e.g. 'pipe:curl -sfL https://host/shards/{NAME_FIELD}'")
        return location.replace(NAME_FIELD, name)
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return str(local_path(location) / name)


def _fsspec_open(url: str, offset: int, size: int | None, timeout_seconds: float) -> IO[bytes]:
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"{url}: reading URLs needs fsspec (pip install fsspec)") from None
    options = {} if size is None else {"size": size}  # a known size spares a HEAD request
    if not url.startswith(("http://", "https://")):
        try:
            filesystem, path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as error:  # e.g. s3fs or gcsfs missing: fsspec names the package
            raise ValueError(f"{url}: {error}") from None
        handle = filesystem.open(path, "rb", **options)  # object stores: ranged block reads
        handle.seek(offset)
        return handle
    import aiohttp

    # HTTP: one streaming GET from ``offset`` (a Range request), so a dropped connection loses only the
    # bytes in flight (fsspec's block reads would fetch the whole block again). A filesystem of its own
    # per file: a pooled keep-alive connection is never shared with a forked DataLoader worker, and a
    # stalled connection times out (then it is retried) instead of hanging.
    timeout = aiohttp.ClientTimeout(sock_connect=timeout_seconds, sock_read=timeout_seconds)
    filesystem = fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout})
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    handle = filesystem.open(url, "rb", block_size=0, headers=headers, **options)
    if offset and handle.r.status != 206:
        handle.close()
        raise ValueError(f"{url}: the server ignored a Range request (status {handle.r.status}), so a broken "
                         f"download cannot resume; serve the shards from a server with byte ranges")
    return handle


class _PipeReader(io.RawIOBase):
    """The standard output of a shell command; closing stops the command."""

    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        read = self.process.stdout.readinto(buffer)
        if not read and self.process.wait() != 0:
            raise OSError(f"`{self.command}` exited with status {self.process.returncode}")
        return read

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.stdout.close()
        self.process.wait()
        super().close()


def _open_at(location: str, offset: int, size: int | None, policy: RetryPolicy) -> IO[bytes]:
    """A file-like reading ``location`` from byte ``offset``."""
    if is_pipe(location):
        handle = _PipeReader(location[len(PIPE_PREFIX):])
        skipped = 0
        while skipped < offset:  # a command cannot seek: read again what was already delivered
            chunk = handle.read(min(1 << 20, offset - skipped))
            if not chunk:
                handle.close()
                raise EOFError(f"the output ended at byte {skipped}, before byte {offset} where the last read broke")
            skipped += len(chunk)
        return handle
    if is_url(location):
        return _fsspec_open(location, offset, size, policy.timeout_seconds)
    handle = open(local_path(location), "rb")
    handle.seek(offset)
    return handle


def _retryable(error: BaseException) -> bool:
    """Errors of a connection or a command that another attempt may not meet; a missing file or a
    refused permission, and the user's own errors, are final."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, ValueError)):
        return False
    if isinstance(error, (OSError, EOFError, TimeoutError)):
        return True
    module = type(error).__module__.split(".")[0]
    return module in ("aiohttp", "fsspec", "botocore", "gcsfs", "s3fs", "google", "asyncio")


class RetryingReader(io.RawIOBase):
    """``size`` bytes of ``location`` as one stream, re-opened where it broke (see the module docstring)."""

    def __init__(self, location: str, size: int, policy: RetryPolicy = RetryPolicy()):
        self.location, self.size, self.policy = location, size, policy
        self.offset = 0
        self.retries = 0  # over the whole stream, for statistics
        self._handle: IO[bytes] | None = None
        self._failures = 0  # in a row, without progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.offset >= self.size:
            return 0
        while True:
            try:
                if self._handle is None:
                    self._handle = _open_at(self.location, self.offset, self.size, self.policy)
                view = memoryview(buffer)[: self.size - self.offset]
                read = self._handle.readinto(view)
                if not read:
                    raise EOFError(f"the stream ended at byte {self.offset} of {self.size}")
                self.offset += read
                self._failures = 0
                return read
            except Exception as error:  # noqa: BLE001 -- sorted by _retryable; the rest is re-raised
                self._drop_handle()
                if not _retryable(error):  # a ShardReadError: the loader stops instead of skipping the shard
                    raise ShardReadError(f"{self.location}: {type(error).__name__}: {error}") from error
                self._failures += 1
                if self._failures >= self.policy.attempts:
                    raise ShardReadError(f"{self.location}: {type(error).__name__}: {error} at byte {self.offset} "
                                         f"of {self.size}, {self._failures} attempts in a row") from error
                self.retries += 1
                time.sleep(self.policy.wait(self._failures))

    def _drop_handle(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except Exception:  # noqa: BLE001 -- a broken connection may fail to close; it is dropped anyway
                pass
            self._handle = None

    def close(self) -> None:
        self._drop_handle()
        super().close()


def open_shard(location: str, size: int, policy: RetryPolicy = RetryPolicy()) -> IO[bytes]:
    """A buffered stream of the ``size`` bytes of a shard; local files are read directly."""
    if is_local(location):
        return open(local_path(location), "rb")
    return io.BufferedReader(RetryingReader(location, size, policy), buffer_size=1 << 20)


def read_bytes(location: str, policy: RetryPolicy = RetryPolicy()) -> bytes:
    """The whole file at ``location`` (an index), retried like a shard; its length is not known
    beforehand, so a stream that ends early cannot be told from the end and is taken as it is,
    except from a command that fails."""
    if is_local(location):
        return local_path(location).read_bytes()
    failures = 0
    while True:
        try:
            with _open_at(location, 0, None, policy) as handle:
                return handle.read()
        except Exception as error:  # noqa: BLE001 -- sorted by _retryable; the rest is re-raised
            if not _retryable(error):
                raise
            failures += 1
            if failures >= policy.attempts:
                raise ShardReadError(f"{location}: {type(error).__name__}: {error}, {failures} attempts") from error
            time.sleep(policy.wait(failures))
