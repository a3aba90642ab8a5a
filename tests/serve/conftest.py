"""A running ``posttrain serve`` process (real uvicorn on 127.0.0.1) around the tiny random export."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

TOKEN = "s3cret-token-7f1c"  # what the tests send; it must never appear in the service's output


@dataclass
class Server:
    url: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}", **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, work: Path, *options: str) -> Server:
    port = free_port()
    temp_dir = work / "service_tmp"
    temp_dir.mkdir()
    (work / "tokens").write_text(f"# one token a line\n{TOKEN}\n")
    log = work / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "serve", str(model), "--port", str(port), "--temp-dir", str(temp_dir),
         "--token-file", str(work / "tokens"), "--log-level", "info", *options],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return Server(url, temp_dir, log, process)
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server not ready in 120 s:\n{log.read_text()}")


def stop_server(server: Server) -> str:
    server.process.terminate()  # SIGTERM: uvicorn's graceful shutdown runs the lifespan exit
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    return server.log.read_text()


@pytest.fixture(scope="module")
def server(tiny_export_dir, tmp_path_factory):
    """Small limits so every refusal is cheap to provoke: 1 MiB and 60 s per upload, 60 s in flight,
    one request queued for at most 1 s."""
    work = tmp_path_factory.mktemp("serve")
    running = start_server(tiny_export_dir, work, "--max-upload-mb", "1", "--max-upload-seconds", "60",
                           "--max-inflight-seconds", "60", "--max-queue", "1", "--queue-timeout-seconds", "1",
                           "--max-batch-wait-ms", "200", "--window-seconds", "2", "--hop-seconds", "1")
    yield running
    output = stop_server(running)  # the shutdown itself is checked: its folder removed, the token never logged
    assert "Application shutdown complete" in output and TOKEN not in output
    assert list(running.temp_dir.iterdir()) == []
