"""One writer per output folder: ``<output_dir>/posttrain.lock`` names the run that writes there.

Two trainings on one ``output_dir`` (a typo, a requeued job whose old allocation still runs) would both
write checkpoints and move ``latest`` under each other. Rank 0 takes the lock before any model is built
and removes it when the run ends; a second run refuses with the holder's host, pid and SLURM job id.

The lock file is written whole and then hard-linked into place (``os.link`` fails if the name exists,
atomically, on local disks, NFS and Lustre alike), so a reader never sees half a lock. A run killed
without cleaning up (SIGKILL, node loss) leaves its lock behind; it is reclaimed when its holder is
provably gone:
- same host and its pid no longer exists (a PID reused since by an unrelated process counts as alive:
  the lock then needs deleting by hand, as the message says), or
- same SLURM job id as this run: SLURM starts a requeued job only after ending its previous allocation,
  so the lock is that earlier attempt's.
A lock held from another host by another job is never broken automatically (its processes cannot be
seen from here): the message says which host and job to check, and to delete the file if it is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from posttrain.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "posttrain.lock"
TAKEOVER_SUFFIX = ".takeover"  # a second O_EXCL file serialises reclaiming a stale lock


class RunLockError(UserError):
    """Another run writes into this output folder (the user picks another folder or waits)."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    slurm_job_id: str | None
    started_unix_s: float

    @classmethod
    def me(cls) -> "LockHolder":
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return cls(socket.gethostname(), os.getpid(), job, time.time())

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_unix_s))
        return f"host {self.host}, pid {self.pid}{job}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: LockHolder, me: LockHolder) -> str | None:
    """Why ``holder`` provably no longer writes (None: it may still be running)."""
    if holder.host == me.host and holder.pid != me.pid and not _pid_alive(holder.pid):
        return f"its process {holder.pid} on {holder.host} is gone"
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id and (holder.host, holder.pid) != (me.host, me.pid):
        return f"it is an earlier attempt of this SLURM job {holder.slurm_job_id} (requeued)"
    return None


def read_holder(path: Path) -> LockHolder | None:
    """The holder named in a lock file; None if the file is gone."""
    try:
        return LockHolder(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
        raise RunLockError(f"{path}: unreadable run lock ({error}); if no training writes into "
                           f"{path.parent}, delete it") from None


class RunLock:
    """The lock of one run; ``release()`` removes it if it is still ours."""

    def __init__(self, path: Path, holder: LockHolder):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, output_dir: str | Path) -> "RunLock":
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path, me = output_dir / LOCK_NAME, LockHolder.me()
        for _ in range(3):  # a reclaimed lock may be taken by a third run in between: look again
            if _link_new(path, me):
                return cls(path, me)
            holder = read_holder(path)
            if holder is None:
                continue  # released between our link and our read
            reason = stale_reason(holder, me)
            if reason is None:
                raise RunLockError(
                    f"{output_dir} is in use by another training ({holder.describe()}); wait for it, give this "
                    f"run another output_dir, or, if that run is gone, delete {path}")
            _reclaim(path, holder, reason)
        raise RunLockError(f"{path}: could not take the run lock (other runs keep taking it)")

    def release(self) -> None:
        try:
            if read_holder(self.path) == self.holder:
                self.path.unlink()
        except (OSError, RunLockError) as error:
            log.warning("could not release the run lock %s: %s", self.path, error)


def _link_new(path: Path, holder: LockHolder) -> bool:
    """Write the lock whole next to ``path``, then link it into place; False if ``path`` exists."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{LOCK_NAME}.", delete=False,
                                     encoding="utf-8") as handle:
        json.dump(asdict(holder), handle)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(handle.name, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(handle.name)


def _reclaim(path: Path, holder: LockHolder, reason: str) -> None:
    """Remove a stale lock, unless another run reclaims it at the same time or it changed meanwhile."""
    takeover = path.with_name(path.name + TAKEOVER_SUFFIX)
    try:
        descriptor = os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise RunLockError(f"{path}: another run is reclaiming this stale lock right now; if none is, "
                           f"delete {takeover}") from None
    try:
        if read_holder(path) == holder:
            log.warning("taking over the run lock %s: %s (%s)", path, reason, holder.describe())
            path.unlink()
    finally:
        os.close(descriptor)
        takeover.unlink()


def acquire_run_lock(output_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 takes the output folder's run lock; every rank raises ``RunLockError`` if it could not."""
    import torch.distributed as torch_dist

    lock, refusal = None, None
    if rank == 0:
        try:
            lock = RunLock.acquire(output_dir)
        except RunLockError as error:
            refusal = str(error)
    if torch_dist.get_world_size() > 1:
        box = [refusal]
        torch_dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunLockError(refusal)
    return lock
