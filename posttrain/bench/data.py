"""The training loader: padding per bucket policy, and throughput against plain decoding.

Padding (``--only padding``): one epoch of ``ShardStream`` per bucket policy (``uniform`` = before,
``fitted`` = the default, ``antideepfake`` = AD's sampler) and crop policy (``none``, ``antideepfake``),
on two corpora: the demo corpus (``posttrain data demo``: letters and syllables, p50 ~0.6 s, max
~3.5 s) and a synthetic long-tailed one (log-normal durations, p50 3 s, sigma 1, 0.3-120 s). The
padding fraction is the share of padded samples ``B x longest`` that are zeros.

Throughput (``--only throughput``): audio-seconds per core-second of the full loader (tar reading,
JSON, crop, bucketing, batch fill, hand-over from workers, state accounting) vs plain decoding
(``tarfile`` + ``soundfile``: the floor any loader pays), on two synthetic corpora (``--corpora``):
``clips``, ``--files`` clips of ``--seconds`` (300 x 12 s, an hour), and ``short``, ``--short-files``
short clips with the demo corpus's durations (log-normal, p50 0.6 s, clipped to 0.2-3.5 s; 5000 clips,
about an hour). Where decoding a clip is cheap, the loader's costs per sample (tar members, JSON,
row fill, hand-over) weigh most: the short corpus is where they show. Both paths count the source
seconds per CPU second of the process and its workers; the loader's CPU includes starting its
workers. The loader decodes only the window of a cropped file, so on a corpus of files longer than
the crop the ``crop=antideepfake`` rows count seconds it did not decode (neither corpus is cropped:
12 s and 3.5 s are under the 13 s the crop cuts above; the short corpus has only ``crop=none`` rows).
``--epochs 2`` also times a second epoch (a new epoch restarts no worker when they persist).

Two baselines: plain decoding in one process (``vs 1 plain``), and in as many processes as the loader
keeps busy (``vs N plain``: its workers, or one without). On a small VM two busy cores decode up to
a quarter slower per core than one (shared caches and memory bandwidth, a host that shares the cores),
which no loader design can avoid; ``vs N plain`` is what the loader itself costs. A VM's per-core speed
also drifts by tens of per cent from minute to minute, so every round times all paths back to back
(in a rotating order) and the table gives each ratio's median and range over the rounds.

``python -m posttrain.bench data [--only padding|throughput] [--demo DIR] [--shards DIR ...]
[--corpora clips short] [--files 300] [--seconds 12] [--short-files 5000] [--long-tailed-files 1000]
[--workers 0 1 2] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from posttrain.config import CropConfig, StreamConfig

POLICIES = ("uniform", "fitted", "antideepfake")


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _decode_shards(paths: list[str]) -> tuple[float, float]:
    """(audio seconds, CPU seconds of this process) of decoding every FLAC of the tars ``paths``."""
    from posttrain.data.shards import iter_shard

    cpu, seconds = time.process_time(), 0.0
    for path in paths:
        for _, files in iter_shard(path):
            samples, rate_hz = sf.read(io.BytesIO(files["flac"]), dtype="float32")
            seconds += len(samples) / rate_hz
    return seconds, time.process_time() - cpu


def plain_decode(directories: list[str], processes: int = 1) -> tuple[float, float, float]:
    """(audio seconds, CPU seconds, wall seconds) of decoding every FLAC of the shard sets, in
    ``processes`` forked processes that split the tars (their start is not counted)."""
    from posttrain.data.shards import shard_paths

    paths = [str(path) for directory in directories for path in shard_paths(directory)]
    wall = time.perf_counter()
    if processes == 1:
        seconds, cpu = _decode_shards(paths)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_decode_shards, [paths[i::processes] for i in range(processes)])
        seconds, cpu = sum(part[0] for part in parts), sum(part[1] for part in parts)
    return seconds, cpu, time.perf_counter() - wall


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


def short_clip_durations(num_files: int, seed: int = 0) -> list[float]:
    """Durations like the demo corpus's letters and syllables: log-normal, p50 0.6 s, clipped to
    [0.2, 3.5] s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(0.6), 0.6, num_files), 0.2, 3.5).round(3).tolist()


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
    from posttrain.data.shard_set import ShardSet

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


def _spread(values: list[float], unit: str = "%") -> str:
    """``median [min-max]`` of ratios (``%``) or rates."""
    low, middle, high = np.min(values), np.median(values), np.max(values)
    if unit == "%":
        return f"{middle:>4.0%} [{low:.0%}-{high:.0%}]"
    return f"{middle:>5.0f} [{low:.0f}-{high:.0f}]"


def throughput_table(directories: list[str], workers: list[int], repeats: int, epochs: int,
                     crops: tuple[str, ...] = ("none", "antideepfake")) -> None:
    loaders = [(crop, num_workers) for crop in crops for num_workers in workers]
    parallel = sorted({1} | {max(1, num_workers) for num_workers in workers})
    plain_decode(directories)  # warm the page cache so every path reads from memory
    plain: dict[int, list[tuple[float, float, float]]] = {n: [] for n in parallel}
    runs: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {path: [] for path in loaders}
    paths: list[Any] = [("plain", n) for n in parallel] + loaders
    for round_index in tqdm(range(repeats), desc="rounds", unit="round"):
        shift = round_index % len(paths)
        for path in paths[shift:] + paths[:shift]:
            if path[0] == "plain":
                plain[path[1]].append(plain_decode(directories, path[1]))
            else:
                runs[path].append(loader(directories, path[1], path[0], epochs))
    audio = plain[1][0][0]
    print(f"\n{audio:.0f} audio-s in {', '.join(directories)}; {epochs} loader epoch(s) per run; "
          f"median [range] over {repeats} rounds")
    print(f"{'path':<34} {'audio-s/core-s':>18} {'vs 1 plain':>16} {'vs N plain':>16} {'audio-s/wall-s':>18} "
          f"{'padding':>8}")
    per_core = {n: [a / c for a, c, _ in plain[n]] for n in parallel}
    for n in parallel:
        print(f"{f'plain decode, {n} process(es)':<34} {_spread(per_core[n], 'rate'):>18} "
              f"{_spread([r / b for r, b in zip(per_core[n], per_core[1])]):>16} {'-':>16} "
              f"{_spread([a / w for a, _, w in plain[n]], 'rate'):>18} {'-':>8}")
    for crop, num_workers in loaders:
        rates = [a / c for a, c, _, _ in runs[crop, num_workers]]
        same = per_core[max(1, num_workers)]
        print(f"{f'loader crop={crop} workers={num_workers}':<34} {_spread(rates, 'rate'):>18} "
              f"{_spread([r / b for r, b in zip(rates, per_core[1])]):>16} "
              f"{_spread([r / b for r, b in zip(rates, same)]):>16} "
              f"{_spread([a / w for a, _, w, _ in runs[crop, num_workers]], 'rate'):>18} "
              f"{runs[crop, num_workers][0][3]:>8.1%}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench data")
    parser.add_argument("--only", choices=["padding", "throughput"], help="one table (default: both)")
    parser.add_argument("--demo", metavar="DIR", help="padding: a `posttrain data demo` folder (default: build one)")
    parser.add_argument("--long-tailed-files", type=int, default=1000, help="padding: files of the long-tailed corpus")
    parser.add_argument("--shards", nargs="+", metavar="DIR", help="throughput: shard sets (default: --corpora)")
    parser.add_argument("--corpora", nargs="+", choices=["clips", "short"], default=["clips", "short"],
                        help="throughput: synthetic corpora (clips: --files x --seconds; short: --short-files)")
    parser.add_argument("--files", type=int, default=300, help="throughput: files of the clips corpus")
    parser.add_argument("--seconds", type=float, default=12.0, help="throughput: seconds per file of the clips corpus")
    parser.add_argument("--short-files", type=int, default=5000, help="throughput: files of the short-clip corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every path, back to back")
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
        if args.only != "padding" and args.shards:
            throughput_table(args.shards, args.workers, args.repeats, args.epochs)
        elif args.only != "padding":
            for corpus in args.corpora:
                if corpus == "clips":
                    directory = build_set(scratch, "clips", [args.seconds] * args.files)
                    crops = ("none", "antideepfake")
                else:  # at 16 kHz mono: the build resamples nothing, the bench starts sooner
                    directory = build_set(scratch, "short", short_clip_durations(args.short_files), rate_hz=16000,
                                          channels=1)
                    crops = ("none",)  # no clip reaches the 13 s the crop cuts above
                print(f"\n{corpus}: {describe(directory)}")
                throughput_table([directory], args.workers, args.repeats, args.epochs, crops)
    return 0
