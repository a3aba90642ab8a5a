"""``python -m posttrain.bench serve``: load on a running ``posttrain serve`` over the loopback.

Starts the service (the tiny random model unless ``--model``) in its own process, then runs the
scenarios (``--scenario``):

``mixed``       short requests among long ones: first one client sending short clips (<= 1 s) to the idle
                service, then ``--mixed-clients`` clients for ``--mixed-seconds``, half sending short clips
                and half 30 s files back to back (short clients pause ``--short-pause-ms`` between
                requests, as people do); p50/p99 latency per length class, and the short clips' p50 under
                load as a multiple of their idle p50 (goal: at most 3x).
``bad-inputs``  ``--clients`` clients for ``--seconds``: all good uploads (2..8 s clips), then every fourth
                request a bad input (corrupt bytes, truncated WAV, wrong content type, oversize body,
                digital silence).

Prints throughput, p50/p99 latency, answers by class, 503 rejections, 5xx and lost requests (no HTTP
answer at all), and the service's RSS at the start, end and peak of each phase. Exit code 1 when any
5xx or lost request occurred.
"""

from __future__ import annotations

import argparse
import io
import itertools
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RATE = 16000


def _clip(seconds: float, seed: int) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.2 * np.sin(2 * np.pi * (150 + 20 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    out = io.BytesIO()
    sf.write(out, wave.astype(np.float32), RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _requests(max_upload_bytes: int) -> tuple[list[tuple[bytes, str, float]], list[tuple[bytes, str, str]]]:
    """Good uploads ``(bytes, content type, seconds)`` and bad ones ``(bytes, content type, kind)``."""
    import soundfile as sf

    good = [(_clip(seconds, seed), "audio/wav", seconds) for seed, seconds in enumerate((2.0, 3.5, 5.0, 8.0))]
    wav = good[1][0]
    silence = io.BytesIO()
    sf.write(silence, np.zeros(3 * RATE, np.float32), RATE, format="WAV", subtype="FLOAT")
    bad = [(b"\x00\x01garbage" * 500, "audio/wav", "corrupt"), (wav[: len(wav) // 2], "audio/wav", "truncated"),
           (b"hello", "text/plain", "content_type"), (b"\x00" * (max_upload_bytes + 1), "audio/wav", "oversize"),
           (silence.getvalue(), "audio/wav", "silence")]
    return good, bad


@dataclass
class Phase:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    by_class: dict[str, list[float]] = field(default_factory=dict)  # latencies of 200s per length class
    statuses: dict[int, int] = field(default_factory=dict)
    lost: int = 0
    audio_s: float = 0.0
    rss_mb: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int | None, latency_s: float, audio_s: float, length_class: str = "") -> None:
        with self.lock:
            if status is None:
                self.lost += 1
                return
            self.latencies_s.append(latency_s)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.audio_s += audio_s
                self.by_class.setdefault(length_class, []).append(latency_s)

    def class_p(self, length_class: str, q: float) -> float:
        return float(np.percentile(self.by_class.get(length_class, [np.nan]), q) * 1000)

    def count(self, low: int, high: int) -> int:
        return sum(n for status, n in self.statuses.items() if low <= status < high)

    def row(self) -> list[str]:
        done = len(self.latencies_s) + self.lost
        p50, p99 = (np.percentile(self.latencies_s, [50, 99]) * 1000) if self.latencies_s else (float("nan"),) * 2
        return [self.name, str(done), f"{done / self.wall_s:.1f}", f"{self.audio_s / self.wall_s:.0f}",
                f"{p50:.0f}", f"{p99:.0f}", str(self.count(200, 300)), str(self.count(400, 500)),
                str(self.statuses.get(503, 0)), str(self.count(500, 600) - self.statuses.get(503, 0)),
                str(self.lost), f"{self.rss_mb[0]:.0f}/{self.rss_mb[-1]:.0f}/{max(self.rss_mb):.0f}"]


COLUMNS = ("phase", "requests", "req/s", "audio-s/s", "p50 ms", "p99 ms", "2xx", "4xx", "503", "other 5xx",
           "lost", "RSS MB start/end/peak")


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def run_phase(name: str, url: str, pid: int, clients: int, seconds: float, good, bad, bad_every: int,
              per_client: list | None = None) -> Phase:
    """``clients`` threads posting for ``seconds``: from ``good`` (every ``bad_every``-th from ``bad``), or,
    with ``per_client``, client ``i`` from ``per_client[i]`` = (length class, clips, pause between requests
    in seconds)."""
    import requests

    phase = Phase(name, rss_mb=[_rss_mb(pid)])
    stop_at = time.monotonic() + seconds
    counter = itertools.count()

    def client(index: int) -> None:
        session = requests.Session()
        while time.monotonic() < stop_at:
            n = next(counter)
            length_class, pause_s = "", 0.0
            if per_client is not None:
                length_class, clips, pause_s = per_client[index]
                data, kind, audio_s = clips[n % len(clips)]
            elif bad_every and n % bad_every == bad_every - 1:
                data, kind, audio_s = *bad[(n // bad_every) % len(bad)][:2], 0.0
            else:
                data, kind, audio_s = good[n % len(good)]
            started = time.perf_counter()
            try:
                response = session.post(f"{url}/v1/score", data=data, headers={"Content-Type": kind}, timeout=120)
                phase.record(response.status_code, time.perf_counter() - started, audio_s, length_class)
            except requests.RequestException:
                phase.record(None, 0.0, 0.0)
            time.sleep(pause_s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.5)
        phase.rss_mb.append(_rss_mb(pid))
    phase.wall_s = time.monotonic() - started
    phase.rss_mb.append(_rss_mb(pid))
    return phase


def _metric(url: str, name: str) -> float:
    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _start(model: str, port: int, temp: Path, args: argparse.Namespace) -> subprocess.Popen:
    import requests

    command = [sys.executable, "-m", "posttrain", "serve", model, "--port", str(port), "--temp-dir", str(temp),
               "--max-upload-mb", str(args.max_upload_mb), "--max-inflight-seconds", str(args.max_inflight_seconds),
               "--max-upload-seconds", str(min(600.0, args.max_inflight_seconds)), "--max-queue", str(args.max_queue),
               "--log-level", "warning", *args.serve_option]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"posttrain serve exited with {process.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except requests.ConnectionError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("posttrain serve not ready in 180 s")


def _tiny_model(directory: Path) -> str:
    import torch

    from posttrain.config import ModelConfig
    from posttrain.hub.export import export_detector, identity_document
    from posttrain.models.detector import build_detector

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset="tiny"))
    return str(export_detector(detector, directory / "model", identity_document(detector, preset="tiny"),
                               "# tiny random model for the serve benchmark\n"))


def _mixed(url: str, pid: int, args: argparse.Namespace) -> tuple[list[Phase], float]:
    """The idle baseline of short clips, then half the clients short and half long; returns the phases and
    the short clips' p50 under load as a multiple of their idle p50."""
    short = [(_clip(seconds, seed), "audio/wav", seconds) for seed, seconds in enumerate((0.3, 0.6, 1.0))]
    long = [(_clip(30.0, 7 + seed), "audio/wav", 30.0) for seed in range(2)]
    pause = args.short_pause_ms / 1000
    idle = run_phase("idle, short only", url, pid, 1, min(10.0, args.mixed_seconds), [], [], 0,
                     per_client=[("short", short, pause)])
    half = args.mixed_clients // 2
    mixed = run_phase("mixed lengths", url, pid, args.mixed_clients, args.mixed_seconds, [], [], 0,
                      per_client=[("short", short, pause)] * half + [("long", long, 0.0)] * (args.mixed_clients - half))
    return [idle, mixed], mixed.class_p("short", 50) / idle.class_p("short", 50)


def _print_table(phases: list[Phase]) -> None:
    rows = [list(COLUMNS)] + [phase.row() for phase in phases]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: a tiny random model)")
    parser.add_argument("--scenario", choices=["mixed", "bad-inputs", "all"], default="all")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the bad-inputs scenario")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each bad-inputs phase")
    parser.add_argument("--mixed-clients", type=int, default=12, help="clients of the mixed scenario (half short)")
    parser.add_argument("--mixed-seconds", type=float, default=60.0, help="length of the mixed phase")
    parser.add_argument("--short-pause-ms", type=float, default=200.0,
                        help="a short-clip client's pause between requests (people upload, read, upload again; "
                             "0: back to back, which saturates the short lane itself)")
    parser.add_argument("--port", type=int, default=8765, help="loopback port")
    parser.add_argument("--max-upload-mb", type=float, default=4.0, help="the service's upload limit")
    parser.add_argument("--max-inflight-seconds", type=float, default=1200.0,
                        help="the service's audio-seconds bound (small values show the 503 back-pressure)")
    parser.add_argument("--max-queue", type=int, default=32, help="the service's admission queue")
    parser.add_argument("--serve-option", action="append", default=[], metavar="OPTION",
                        help="one more option for the service, e.g. --serve-option=--max-batch-seconds=64")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-serve-"))
    phases: list[Phase] = []
    slowdown = None
    try:
        model = args.model or _tiny_model(work)
        (work / "tmp").mkdir()
        process = _start(model, args.port, work / "tmp", args)
        try:
            good, bad = _requests(int(args.max_upload_mb * 2**20))
            url = f"http://127.0.0.1:{args.port}"
            run_phase("warm-up", url, process.pid, 2, 3.0, good, bad, 0)
            if args.scenario in ("mixed", "all"):
                mixed, slowdown = _mixed(url, process.pid, args)
                phases += mixed
            if args.scenario in ("bad-inputs", "all"):
                phases += [run_phase("good only", url, process.pid, args.clients, args.seconds, good, bad, 0),
                           run_phase("1 in 4 bad", url, process.pid, args.clients, args.seconds, good, bad, 4)]
            left = list((work / "tmp").rglob("*.upload"))
            passes, windows = _metric(url, "posttrain_serve_forward_passes_total"), _metric(url, "posttrain_serve_windows_total")
        finally:
            process.terminate()
            process.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"posttrain serve on the loopback, model {args.model or 'tiny (random)'}, at most "
          f"{args.max_inflight_seconds:g} audio-s in flight, queue {args.max_queue}")
    _print_table(phases)
    for phase in phases:
        for length_class in sorted(phase.by_class):
            if length_class:
                print(f"  {phase.name}: {length_class} clips: p50 {phase.class_p(length_class, 50):.0f} ms, "
                      f"p99 {phase.class_p(length_class, 99):.0f} ms ({len(phase.by_class[length_class])} answered)")
    if slowdown is not None:
        print(f"short clips under load: p50 {slowdown:.2f}x their idle p50 (goal: <= 3)")
    print(f"forward passes: {passes:.0f} for {windows:.0f} windows ({windows / max(passes, 1):.1f} windows a pass, "
          f"all phases)")
    failures = sum(int(phase.row()[9]) + phase.lost for phase in phases)
    print(f"uploads left in the service's temp folder: {len(left)}; 5xx (not 503) + lost: {failures}")
    return 1 if failures or left else 0
