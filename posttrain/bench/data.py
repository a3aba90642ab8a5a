"""Loader throughput: audio-seconds per core-second of the full training loader vs plain decoding.

Plain: read each tar with ``tarfile`` and decode every FLAC with ``soundfile`` (the floor any loader
pays). Loader: ``ShardStream`` over the same shards (webdataset reading, JSON, crop, normalisation,
shuffle buffer, bucketing, collation, state accounting). Both count the decoded (source) audio
seconds per CPU second of the process and its workers, so cropping does not flatter the loader.
Without ``--shards`` a synthetic set is built with the shard builder.
``python -m posttrain.bench data [--shards DIR ...] [--files 48] [--seconds 12] [--workers 0 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import soundfile as sf

from posttrain.config import CropConfig, StreamConfig


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def plain_decode(directories: list[str]) -> tuple[float, float, float]:
    """(audio seconds, CPU seconds, wall seconds) of decoding every FLAC of the shard sets."""
    from posttrain.data.shards import iter_shard, shard_paths

    cpu, wall, seconds = _cpu_seconds(), time.perf_counter(), 0.0
    for directory in directories:
        for path in shard_paths(directory):
            for _, files in iter_shard(path):
                samples, rate_hz = sf.read(io.BytesIO(files["flac"]), dtype="float32")
                seconds += len(samples) / rate_hz
    return seconds, _cpu_seconds() - cpu, time.perf_counter() - wall


def loader(directories: list[str], num_workers: int, crop: str) -> tuple[float, float, float, float]:
    """(source audio seconds, CPU seconds, wall seconds, padding fraction) of one loader epoch."""
    from posttrain.data.stream import ShardStream

    cfg = StreamConfig(shards=list(directories), num_workers=num_workers, crop=CropConfig(policy=crop))
    stream = ShardStream(cfg, rank=0, world_size=1)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    for _ in stream:
        pass
    stats = stream.stats()
    return stats["source_seconds"], _cpu_seconds() - cpu, time.perf_counter() - wall, stats["padding_fraction"]


def synthetic_shards(scratch: Path, num_files: int, seconds: float) -> str:
    from posttrain.bench.shards import write_bench_corpus
    from posttrain.data.shard_build import build_shards

    (scratch / "corpus").mkdir()
    protocol = write_bench_corpus(scratch / "corpus", num_files, seconds)
    build_shards([protocol], scratch / "corpus", scratch / "shards", max_samples_per_shard=max(1, num_files // 8),
                 progress=False)
    return str(scratch / "shards")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench data")
    parser.add_argument("--shards", nargs="+", metavar="DIR", help="shard sets (default: a synthetic one)")
    parser.add_argument("--files", type=int, default=48, help="synthetic set: number of files")
    parser.add_argument("--seconds", type=float, default=12.0, help="synthetic set: seconds per file")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs (the machine may be shared)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        directories = args.shards or [synthetic_shards(Path(scratch), args.files, args.seconds)]
        plain_decode(directories)  # warm the page cache so both sides read from memory
        audio, cpu, wall = min((plain_decode(directories) for _ in range(args.repeats)), key=lambda r: r[1])
        plain_rate = audio / cpu
        print(f"{audio:.0f} audio-s in {', '.join(directories)}")
        print(f"{'path':<34} {'audio-s/core-s':>15} {'vs plain':>9} {'audio-s/wall-s':>15} {'padding':>8}")
        print(f"{'plain soundfile decode':<34} {plain_rate:>15.0f} {1.0:>9.0%} {audio / wall:>15.0f} {'-':>8}")
        for crop in ("none", "antideepfake"):
            for workers in args.workers:
                runs = [loader(directories, workers, crop) for _ in range(args.repeats)]
                audio, cpu, wall, padding = min(runs, key=lambda r: r[1])
                print(f"{f'loader crop={crop} workers={workers}':<34} {audio / cpu:>15.0f} "
                      f"{audio / cpu / plain_rate:>9.0%} {audio / wall:>15.0f} {padding:>8.1%}")
    return 0
