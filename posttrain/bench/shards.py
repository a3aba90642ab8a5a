"""Shard build throughput: audio-seconds per core-second (decode + resample + FLAC encode + tar).

Generates 44.1 kHz stereo WAV files (tone + noise), builds 16 kHz FLAC shards with 1 and 2 workers,
and divides audio seconds by the CPU seconds of the build process and its workers.
``python -m posttrain.bench shards [--files 48] [--seconds 10] [--workers 1 2]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from posttrain.data.protocol import ProtocolRow, write_protocol


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_bench_corpus(directory: Path, durations_seconds: Sequence[float], rate_hz: int = 44100,
                       channels: int = 2, noise: float = 0.05) -> Path:
    """One WAV per duration (a tone per file, plus white noise of amplitude ``noise``, so FLAC has
    real work) and its protocol CSV; returns the CSV path."""
    rng = np.random.default_rng(0)
    rows = []
    for i, seconds in enumerate(durations_seconds):
        t = np.arange(int(seconds * rate_hz)) / rate_hz
        tone = 0.3 * np.sin(2 * np.pi * (200 + 10 * (i % 100)) * t)
        wave = np.stack([tone + noise * rng.standard_normal(len(t)) for _ in range(channels)], 1)
        sf.write(directory / f"{i:05d}.wav", wave.astype(np.float32), rate_hz, subtype="PCM_16")
        rows.append(ProtocolRow(id=f"BENCH-{i:05d}", label=("real", "fake")[i % 2], duration_s=len(t) / rate_hz,
                                path=f"$ROOT/{i:05d}.wav", sample_rate_hz=rate_hz))
    write_protocol(rows, directory / "bench.csv")
    return directory / "bench.csv"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench shards")
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=30.0, help="audio seconds per file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    from posttrain.data.shard_build import build_shards

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        protocol = write_bench_corpus(scratch, [args.seconds] * args.files)
        audio_seconds = args.files * args.seconds
        print(f"{args.files} files x {args.seconds:g} s, 44.1 kHz stereo WAV -> 16 kHz mono FLAC shards")
        for workers in args.workers:
            cpu, wall = _cpu_seconds(), time.perf_counter()
            build_shards([protocol], scratch, scratch / f"out{workers}", max_samples_per_shard=max(1, args.files // 8),
                         num_workers=workers, progress=False)
            cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
            print(f"workers={workers}: {audio_seconds / cpu:8.0f} audio-s per core-s (CPU {cpu:.2f} s), "
                  f"{audio_seconds / wall:8.0f} audio-s per wall-s (wall {wall:.2f} s)")
    return 0
