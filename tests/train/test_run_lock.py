"""One writer per output folder: the run lock, its stale-lock rules, and two real trainings on one folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from posttrain.train.run_lock import LOCK_NAME, LockHolder, RunLock, RunLockError

HOLD_SCRIPT = ("import sys, time\nfrom posttrain.train.run_lock import RunLock\n"
               "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)\n")


def _write_lock(directory, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None, "started_unix_s": 0.0}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps({**holder, **fields}))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_live_holder_in_another_process_refuses_the_second_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError) as caught:
            RunLock.acquire(tmp_path)
        message = str(caught.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}" in message and str(tmp_path / LOCK_NAME) in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock.acquire(tmp_path)  # its holder is dead now: reclaimed
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_rules(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    dead = _dead_pid()
    _write_lock(tmp_path / "dead", pid=dead)
    RunLock.acquire(tmp_path / "dead").release()
    assert f"its process {dead} on {socket.gethostname()} is gone" in caplog.text

    _write_lock(tmp_path / "requeued", host="node-old", pid=1, slurm_job_id="4242")
    RunLock.acquire(tmp_path / "requeued").release()
    assert "earlier attempt of this SLURM job 4242" in caplog.text

    _write_lock(tmp_path / "elsewhere", host="node-other", pid=dead, slurm_job_id="999")
    with pytest.raises(RunLockError, match=r"in use by another training \(host node-other, pid \d+, SLURM job 999"):
        RunLock.acquire(tmp_path / "elsewhere")  # another host's pid says nothing here: never broken

    _write_lock(tmp_path / "alive", pid=os.getppid(), slurm_job_id="999")
    with pytest.raises(RunLockError, match="in use by another training"):
        RunLock.acquire(tmp_path / "alive")


def test_release_keeps_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock.acquire(tmp_path)
    other = LockHolder("node-other", 7, "1", time.time())
    (tmp_path / LOCK_NAME).write_text(json.dumps(asdict(other)))
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "node-other"


def _train_command(out, shard_dir, max_steps: int) -> list[str]:
    overrides = [f"output_dir={out}", "model.preset=tiny", f"train.max_steps={max_steps}", "train.zero_stage=1",
                 "train.precision=fp32", "train.device=cpu", "tracking.enabled=false", "checkpoint.every_steps=0",
                 f"data.train.shards=[{shard_dir}]", "data.train.num_workers=0", "data.valid.shards=[]",
                 "train.max_epochs=1000000", "checkpoint.every_minutes=0", "schedule.warmup_steps=0"]
    return [sys.executable, "-m", "posttrain", "train", "--config", "configs/posttrain/demo.yaml", *overrides]


@pytest.mark.slow
def test_two_trainings_on_one_output_folder(shard_dir, tmp_path):
    """The second training refuses at once, naming the first; once the first is killed, its lock is
    stale (same host, dead pid) and a third training takes the folder over and frees it at its end."""
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    first = subprocess.Popen(_train_command(out, shard_dir, 10**6), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first training never took the lock"
            time.sleep(0.2)
        second = subprocess.run(_train_command(out, shard_dir, 2), env=env, capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None, first.stderr.read()[-3000:]
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    error = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(error) == 1, second.stderr[-3000:]
    assert f"is in use by another training (host {socket.gethostname()}, pid {first.pid}" in error[0]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # the killed run's lock stays

    third = subprocess.run(_train_command(out, shard_dir, 2), env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the run lock {out / LOCK_NAME}: its process {first.pid}" in third.stderr
    assert not (out / LOCK_NAME).exists()  # released at the end of the run
    assert "untested optimizer" not in third.stdout + third.stderr  # DeepSpeed's noise about our own AdamW
