"""The service's own temporary folder, and the removal of folders a killed service left behind.

Each running service holds an exclusive ``flock`` on ``.lock`` inside its folder for as long as the
process lives; the kernel drops it when the process dies, however it dies (``kill -9`` included). At
start, a folder whose lock can be taken is a dead service's and is removed. A pid would not do: the
system reuses them. A folder without a lock file is only removed when it is older than
``UNLOCKED_GRACE_S`` (a live service creates its folder and locks it a moment later).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "posttrain-serve-"
LOCK_NAME = ".lock"
UNLOCKED_GRACE_S = 60.0


class ServiceFolder:
    """A fresh folder under ``base`` (the system's temporary folder when None), locked while open."""

    def __init__(self, base: str | Path | None):
        base = Path(base) if base is not None else Path(tempfile.gettempdir())
        self.removed_stale = remove_stale(base)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        self._lock = os.open(self.path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def files(self) -> list[Path]:
        """What the service holds now (its lock aside)."""
        return [path for path in self.path.rglob("*") if path.name != LOCK_NAME]

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)


def remove_stale(base: Path) -> list[Path]:
    """Remove the folders of services that are gone; returns them."""
    removed = []
    for folder in sorted(base.glob(f"{PREFIX}*")):
        if folder.is_dir() and _is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.info("removed %s, left by a service that is no longer running", folder)
    return removed


def _is_stale(folder: Path) -> bool:
    lock = folder / LOCK_NAME
    if not lock.exists():
        return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
    try:
        handle = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live service holds it
    finally:
        os.close(handle)  # closing also releases the lock taken just now
    return True
