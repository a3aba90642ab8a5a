"""``python -m posttrain.bench attacks``: the attack table of the audio boundary, against a real
``posttrain serve`` (the tiny random model unless ``--model``) with its default limits except a 60 s
upload deadline. Each row: what was sent, the answer, the time to it, and the server's peak resident
memory while the row ran (polled every 20 ms). A row that kills the server ends the table.

Rows: a 140-byte WAV claiming 2,147,483,647 Hz; 1 s WAVs at 16,001 and 8,001 Hz; a 60-minute MP3 behind
a 1 s Xing header; a 20-minute FLAC whose STREAMINFO says 1 s; a 1.2 MB Opus (Matroska) of 20 minutes
declaring 1 s; 2,000 requests to random paths without a token (the /metrics series before and after);
300 idle connections plus one upload trickled for 70 s; a chunked 600 MiB batch (MiB written to the
service's folder before the 413); SIGTERM with a stalled upload (seconds to exit); ``kill -9`` and a new
service on the same folder (is the old folder removed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from posttrain.bench.hostile_audio import (flac_declaring, mka_declaring_one_second, mp3_behind_short_xing,
                                           wav_header, wav_with_rate)

HEADER_ROWS = ("input", "answer", "time s", "peak RSS MB")


class Service:
    """A ``posttrain serve`` process and a poller of its memory."""

    def __init__(self, model: str, folder: Path, port: int, *options: str):
        self.folder, self.port, self.url = folder, port, f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", model, "--port", str(port),
                                         "--temp-dir", str(folder), "--log-level", "warning", *options],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.3)
            if self.process.poll() is not None:
                raise SystemExit(f"posttrain serve exited with {self.process.returncode}")
        raise SystemExit("posttrain serve not ready in 180 s")

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def measure(self, action) -> tuple[str, float, float]:
        """``(answer, seconds, peak RSS MB)`` of ``action()`` (which returns the answer)."""
        peak, done = [self.rss_mb()], threading.Event()

        def poll():
            while not done.is_set():
                peak.append(self.rss_mb())
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        started = time.perf_counter()
        try:
            answer = action()
        except requests.RequestException as error:
            answer = f"no answer ({type(error).__name__})"
        elapsed = time.perf_counter() - started
        done.set()
        poller.join()
        if self.process.poll() is not None:
            answer += f"; the server died (exit {self.process.returncode})"
        return answer, elapsed, max(peak)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def _answer(response: requests.Response) -> str:
    body = response.json()
    if response.status_code == 200:
        warnings = "; ".join(body.get("warnings", [])) or "no warning"
        return f"200, seconds {body['seconds']:.1f}, {warnings[:60]}"
    return f"{response.status_code} {body.get('error')}"


def _post(service: Service, data: bytes, name: str) -> str:
    return _answer(requests.post(f"{service.url}/v1/score", data=data, timeout=600,
                                 headers={"Content-Type": "application/octet-stream", "X-Filename": name}))


def _series(service: Service) -> int:
    text = requests.get(f"{service.url}/metrics", timeout=30).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def _random_paths(service: Service, count: int) -> str:
    rng = np.random.default_rng(0)
    requests.get(f"{service.url}/warm-the-other-route", timeout=10)  # the one 'other' series, made once
    _series(service)
    before = _series(service)
    with requests.Session() as session:
        for _ in range(count):
            session.get(f"{service.url}/{''.join(rng.choice(list('abcdefgh0123/'), 16))}", timeout=10,
                        headers={"Authorization": "Bearer wrong"})
    return f"/metrics series {before} -> {_series(service)}"


def _raw_headers(length: int) -> bytes:
    return (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: {length}\r\n"
            f"\r\n").encode()


def _idle_and_trickle(service: Service, idle: int, trickle_s: float) -> str:
    trickled = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    trickled.sendall(_raw_headers(1_000_000) + wav_header(16000, 999_956))
    idle_conns = [socket.create_connection(("127.0.0.1", service.port), timeout=5) for _ in range(idle)]
    started, reply = time.monotonic(), b""
    trickled.settimeout(1.0)
    while time.monotonic() - started < trickle_s and not reply:
        try:
            trickled.sendall(b"\x01")
            reply = trickled.recv(200)
        except socket.timeout:
            continue
        except OSError:
            break
    trickle_end = time.monotonic() - started
    closed = 0
    for conn in idle_conns:
        conn.settimeout(0.1)
        try:
            closed += conn.recv(1) == b""
        except (socket.timeout, OSError):
            pass
        conn.close()
    trickled.close()
    status = reply.split(b"\r\n")[0].decode(errors="replace") or "closed without an answer"
    left = len(list(service.folder.rglob("*.upload")))
    return (f"{closed}/{idle} idle closed after {time.monotonic() - started:.0f} s; trickle: {status} after "
            f"{trickle_end:.0f} s; {left} uploads left")


def held_upload_bytes(pid: int, folder: Path) -> int:
    """Bytes in files the process ``pid`` holds open under ``folder``, unlinked ones included (the
    multipart parser spools into anonymous temporary files there)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += fd.stat().st_size
        except OSError:
            continue
    return total


def _big_batch(service: Service, mib: int) -> str:
    boundary = "----attack"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + wav_header(16000, mib * 2**20)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], held_upload_bytes(service.process.pid, service.folder))
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    sent, replies = 0, []
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
        conn.sendall((f"POST /v1/score/batch HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                      f"boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        conn.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        threading.Thread(target=lambda: replies.append(conn.recv(300)), daemon=True).start()
        chunk = b"\x00\x10" * 2**18
        try:
            while sent < mib * 2**20 and not replies:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass
        deadline = time.monotonic() + 30
        while not replies and time.monotonic() < deadline:
            time.sleep(0.05)
    done.set()
    status = replies[0].split(b"\r\n")[0].decode(errors="replace") if replies else "no answer"
    return f"{status} after {sent / 2**20:.0f} MiB sent, at most {peak[0] / 2**20:.1f} MiB held on disk"


def _sigterm(model: str, work: Path, port: int) -> tuple[str, float, float]:
    service = Service(model, work / "sigterm", port, "--upload-timeout-seconds", "600")
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(_raw_headers(1_000_000) + wav_header(16000, 999_956) + b"\x00" * 50_000)
    time.sleep(1.0)
    started = time.perf_counter()
    service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(timeout=120)
        answer = f"exited ({service.process.returncode}); folder left: {list((work / 'sigterm').iterdir()) != []}"
    except subprocess.TimeoutExpired:
        service.process.kill()
        answer = "still running after 120 s"
    conn.close()
    return answer, time.perf_counter() - started, 0.0


def _kill9(model: str, work: Path, port: int) -> tuple[str, float, float]:
    folder = work / "kill9"
    first = Service(model, folder, port, "--upload-timeout-seconds", "600")
    conns = []
    for _ in range(8):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(_raw_headers(3_000_000) + wav_header(16000, 2_999_956) + b"\x00" * 1_800_000)
        conns.append(conn)
    time.sleep(1.0)
    first.process.kill()
    first.process.wait()
    left_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    for conn in conns:
        conn.close()
    started = time.perf_counter()
    second = Service(model, folder, port)
    remaining = [p for p in folder.iterdir()]
    second.stop()
    return (f"killed: {left_mb:.0f} MB left; next service: {len(remaining)} folder(s) there (its own)",
            time.perf_counter() - started, 0.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench attacks")
    parser.add_argument("--model", default=None, help="model spec (default: a tiny random model)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--trickle-seconds", type=float, default=70.0)
    args = parser.parse_args(argv)
    from posttrain.bench.serve import _tiny_model

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-attacks-"))
    model = args.model or _tiny_model(work)
    service = Service(model, work / "tmp", args.port, "--upload-timeout-seconds", "60")
    rows = []
    files = {"a.wav": wav_with_rate(2_147_483_647, 48), "b.wav": wav_with_rate(16_001, 16_001),
             "c.wav": wav_with_rate(8_001, 8_001), "d.mp3": mp3_behind_short_xing(work, 3600.0),
             "e.flac": flac_declaring(1200.0, 8000), "f.mka": mka_declaring_one_second(work, 1200.0)}
    described = {"a.wav": "140-byte WAV claiming 2,147,483,647 Hz", "b.wav": "1 s WAV at 16,001 Hz",
                 "c.wav": "1 s WAV at 8,001 Hz", "d.mp3": "60-min MP3 behind a 1 s Xing header",
                 "e.flac": "20-min FLAC, STREAMINFO says 1 s", "f.mka": "1.2 MB Opus (MKA) of 20 min declaring 1 s"}
    inputs = [(f"{described[name]} ({len(data) / 2**20:.2f} MB)", lambda data=data, name=name: _post(service, data, name))
              for name, data in files.items()]
    inputs += [
        ("2,000 random paths without a token", lambda: _random_paths(service, 2000)),
        (f"300 idle connections + an upload trickled {args.trickle_seconds:g} s",
         lambda: _idle_and_trickle(service, 300, args.trickle_seconds)),
        ("chunked batch of 600 MiB", lambda: _big_batch(service, 600)),
    ]
    try:
        for name, action in inputs:
            answer, seconds, peak = service.measure(action)
            rows.append((name, answer, f"{seconds:.2f}", f"{peak:.0f}"))
            print(" | ".join(rows[-1]), flush=True)
            if service.process.poll() is not None:
                break
    finally:
        service.stop()
    for name, run in (("SIGTERM with one upload stalled", _sigterm), ("kill -9, then a new service", _kill9)):
        answer, seconds, _ = run(model, work, args.port)
        rows.append((name, answer, f"{seconds:.2f}", "-"))
        print(" | ".join(rows[-1]), flush=True)
    print()
    print("| " + " | ".join(HEADER_ROWS) + " |")
    print("|" + "---|" * len(HEADER_ROWS))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0
