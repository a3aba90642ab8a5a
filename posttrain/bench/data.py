"""The training loader: padding per bucket policy, and throughput against plain decoding.

Padding (``--only padding``): one epoch of ``ShardStream`` per bucket policy (``uniform`` = before,
``fitted`` = the default, ``antideepfake`` = AD's sampler) and crop policy (``none``, ``antideepfake``),
on two corpora: the demo corpus (``posttrain data demo``: letters and syllables, p50 ~0.6 s, max
~3.5 s) and a synthetic long-tailed one (log-normal durations, p50 3 s, sigma 1, 0.3-120 s). The
padding fraction is the share of padded samples ``B x longest`` that are zeros.

Throughput (``--only throughput``): audio-seconds per core-second of the full loader (tar reading,
JSON, crop, bucketing, collation, IPC from workers, state accounting) vs plain decoding (``tarfile`` +
``soundfile``: the floor any loader pays), over at least an hour of audio by default. Both count the
decoded (source) seconds per CPU second of the process and its workers, so cropping does not flatter
the loader. ``--epochs 2`` also times a second epoch (a new epoch restarts no worker when they persist).

``python -m posttrain.bench data [--only padding|throughput] [--demo DIR] [--shards DIR ...]
[--files 300] [--seconds 12] [--long-tailed-files 1000] [--workers 0 1 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from posttrain.config import CropConfig, StreamConfig

POLICIES = ("uniform", "fitted", "antideepfake")


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


def loader(directories: list[str], num_workers: int, crop: str, epochs: int = 1,
           bucket_policy: str = "fitted") -> tuple[float, float, float, float]:
    """(source audio seconds, CPU seconds, wall seconds, padding fraction) of ``epochs`` loader epochs."""
    from posttrain.data.stream import ShardStream

    cfg = StreamConfig(shards=list(directories), num_workers=num_workers, crop=CropConfig(policy=crop),
                       bucket_policy=bucket_policy)
    stream = ShardStream(cfg, rank=0, world_size=1)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for _ in stream:
            pass
    stats = stream.stats()
    stream.close()
    return stats["source_seconds"], _cpu_seconds() - cpu, time.perf_counter() - wall, stats["padding_fraction"]


def build_set(scratch: Path, name: str, durations_seconds: list[float], *, rate_hz: int = 44100, channels: int = 2,
              noise: float = 0.05) -> str:
    """A shard set of synthetic WAVs (see ``write_bench_corpus``) built with the shard builder."""
    from posttrain.bench.shards import write_bench_corpus
    from posttrain.data.shard_build import build_shards

    corpus = scratch / f"{name}-corpus"
    corpus.mkdir()
    protocol = write_bench_corpus(corpus, durations_seconds, rate_hz=rate_hz, channels=channels, noise=noise)
    build_shards([protocol], corpus, scratch / name, max_samples_per_shard=max(1, len(durations_seconds) // 8),
                 progress=False)
    return str(scratch / name)


def long_tailed_durations(num_files: int, seed: int = 0) -> list[float]:
    """Log-normal durations (p50 3 s, sigma 1) clipped to [0.3, 120] s: most clips short, a few
    minutes long, as in corpora that mix utterances with whole recordings."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(3.0), 1.0, num_files), 0.3, 120.0).round(3).tolist()


def demo_shards(scratch: Path, demo: str | None) -> str | None:
    """Shards of the demo corpus's train split (``demo``: a ``posttrain data demo`` folder, or built
    here); None when it cannot be built (klettres-data or espeak-ng missing)."""
    from posttrain.data import demo as demo_corpus
    from posttrain.data.shard_build import build_shards

    folder = Path(demo) if demo else scratch / "demo"
    if not demo:
        try:
            demo_corpus.build_demo(folder, progress=False)
        except (OSError, RuntimeError, ValueError) as error:
            print(f"demo corpus not built ({error}); padding on the long-tailed corpus only")
            return None
    build_shards([folder / "train.csv"], folder, scratch / "demo-shards", max_samples_per_shard=64, progress=False)
    return str(scratch / "demo-shards")


def describe(directory: str) -> str:
    from posttrain.data.stream import ShardSet

    seconds = ShardSet.load(directory).durations_seconds(16000)
    p50, p99 = np.percentile(seconds, [50, 99])
    return (f"{seconds.size} clips, {seconds.sum() / 60:.0f} min, p50 {p50:.2f} s, p99 {p99:.1f} s, "
            f"max {seconds.max():.1f} s")


def padding_table(corpora: dict[str, str]) -> None:
    print(f"\n{'corpus':<12} {'crop':<13} " + " ".join(f"{policy:>13}" for policy in POLICIES))
    for name, directory in corpora.items():
        for crop in ("none", "antideepfake"):
            fractions = [loader([directory], 2, crop, bucket_policy=policy)[3] for policy in POLICIES]
            print(f"{name:<12} {crop:<13} " + " ".join(f"{fraction:>13.1%}" for fraction in fractions))


def throughput_table(directories: list[str], workers: list[int], repeats: int, epochs: int) -> None:
    plain_decode(directories)  # warm the page cache so both sides read from memory
    audio, cpu, wall = min((plain_decode(directories) for _ in range(repeats)), key=lambda r: r[1])
    plain_rate = audio / cpu
    print(f"\n{audio:.0f} audio-s in {', '.join(directories)}; {epochs} loader epoch(s) per run, best of {repeats}")
    print(f"{'path':<34} {'audio-s/core-s':>15} {'vs plain':>9} {'audio-s/wall-s':>15} {'padding':>8}")
    print(f"{'plain soundfile decode':<34} {plain_rate:>15.0f} {1.0:>9.0%} {audio / wall:>15.0f} {'-':>8}")
    for crop in ("none", "antideepfake"):
        for num_workers in workers:
            runs = [loader(directories, num_workers, crop, epochs) for _ in range(repeats)]
            audio, cpu, wall, padding = min(runs, key=lambda r: r[1])
            print(f"{f'loader crop={crop} workers={num_workers}':<34} {audio / cpu:>15.0f} "
                  f"{audio / cpu / plain_rate:>9.0%} {audio / wall:>15.0f} {padding:>8.1%}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench data")
    parser.add_argument("--only", choices=["padding", "throughput"], help="one table (default: both)")
    parser.add_argument("--demo", metavar="DIR", help="padding: a `posttrain data demo` folder (default: build one)")
    parser.add_argument("--long-tailed-files", type=int, default=1000, help="padding: files of the long-tailed corpus")
    parser.add_argument("--shards", nargs="+", metavar="DIR", help="throughput: shard sets (default: synthetic)")
    parser.add_argument("--files", type=int, default=300, help="throughput: synthetic files")
    parser.add_argument("--seconds", type=float, default=12.0, help="throughput: seconds per synthetic file")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs (the machine may be shared)")
    parser.add_argument("--epochs", type=int, default=1, help="throughput: loader epochs per run")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.only != "throughput":
            corpora = {"demo": demo_shards(scratch, args.demo),
                       "long-tailed": build_set(scratch, "long-tailed", long_tailed_durations(args.long_tailed_files),
                                                rate_hz=16000, channels=1, noise=0.0)}
            corpora = {name: directory for name, directory in corpora.items() if directory}
            for name, directory in corpora.items():
                print(f"{name}: {describe(directory)}")
            padding_table(corpora)
        if args.only != "padding":
            directories = args.shards or [build_set(scratch, "throughput", [args.seconds] * args.files)]
            throughput_table(directories, args.workers, args.repeats, args.epochs)
    return 0
