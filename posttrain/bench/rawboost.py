"""``python -m posttrain.bench rawboost``: batched torch RawBoost vs the per-clip numpy/scipy way.

The per-clip baseline follows the reference RawBoost code (numpy RNG, scipy firwin/freqz/lfilter per
clip, one clip at a time on one core). Prints clips/s for both and the speed-up per CPU core (CPU
time with one torch thread, so the numbers hold on a shared machine), and with ``--device cuda`` the
batched throughput on the GPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import signal

from posttrain.augment.rawboost import RawBoost
from posttrain.config import RawBoostConfig
from posttrain.data.batch import Batch

# ---------------------------------------------------------------- per-clip baseline (reference code)


class PerClipRawBoost:
    """The reference per-clip algorithms, drawing from a numpy Generator (runs under NumPy 2)."""

    def __init__(self, cfg: RawBoostConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.rng = rng

    def uniform(self, low: float, high: float) -> float:
        # The reference's np.random.uniform accepts high < low (the non-linear gains); Generator's does not.
        return low + (high - low) * self.rng.random()

    def notch(self, min_g_db: float, max_g_db: float) -> np.ndarray:
        cfg, fs = self.cfg, self.cfg.sample_rate_hz
        taps = np.ones(1)
        for _ in range(cfg.n_bands):
            center = self.uniform(cfg.min_f_hz, cfg.max_f_hz)
            width = self.uniform(cfg.min_bw_hz, cfg.max_bw_hz)
            count = int(self.uniform(cfg.min_coeff, cfg.max_coeff)) | 1
            low, high = max(center - width / 2, 1e-3), min(center + width / 2, fs / 2 - 1e-3)
            taps = np.convolve(signal.firwin(count, [low, high], window="hamming", fs=fs), taps)
        _, response = signal.freqz(taps, 1, fs=fs)
        return 10 ** (self.uniform(min_g_db, max_g_db) / 20) * taps / np.abs(response).max()

    @staticmethod
    def fir(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
        pad = taps.shape[0] + 1
        y = signal.lfilter(taps, 1, np.pad(x, (0, pad)))
        return y[pad // 2: y.shape[0] - pad // 2]

    @staticmethod
    def peak_normalise(x: np.ndarray) -> np.ndarray:
        peak = np.abs(x).max()
        return x / peak if peak > 1 else x

    def lnl(self, x: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        y = np.zeros_like(x)
        for j in range(cfg.n_f):
            bias = (cfg.min_bias_db, cfg.max_bias_db) if j else (0.0, 0.0)
            y += self.fir(x ** (j + 1), self.notch(cfg.min_g_db - bias[0], cfg.max_g_db - bias[1]))
        return self.peak_normalise(y - y.mean())

    def isd(self, x: np.ndarray) -> np.ndarray:
        count = int(x.shape[0] * self.uniform(0, self.cfg.p_percent) / 100)
        positions = self.rng.permutation(x.shape[0])[:count]
        factors = (2 * self.rng.random(count) - 1) * (2 * self.rng.random(count) - 1)
        y = x.copy()
        y[positions] += self.cfg.g_sd * x[positions] * factors
        return self.peak_normalise(y)

    def ssi(self, x: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        noise = self.fir(self.rng.normal(0, 1, x.shape[0]), self.notch(cfg.min_g_db, cfg.max_g_db))
        snr_db = self.uniform(cfg.snr_min_db, cfg.snr_max_db)
        return x + noise / np.linalg.norm(noise) * np.linalg.norm(x) / 10 ** (snr_db / 20)

    def __call__(self, x: np.ndarray, algo: int) -> np.ndarray:
        if algo == 8:
            return self.peak_normalise(self.lnl(x) + self.isd(x))
        chains = {0: [], 1: [self.lnl], 2: [self.isd], 3: [self.ssi], 4: [self.lnl, self.isd, self.ssi],
                  5: [self.lnl, self.isd], 6: [self.lnl, self.ssi], 7: [self.isd, self.ssi]}
        for stage in chains[algo]:
            x = stage(x)
        return x


# -------------------------------------------------------------------------------------------- timing


def _clips(batch_size: int, num_samples: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    waves = torch.rand(batch_size, num_samples, generator=generator) * 1.8 - 0.9
    return Batch(waves, torch.full((batch_size,), num_samples), torch.zeros(batch_size, dtype=torch.long),
                 [f"bench-{i}" for i in range(batch_size)], [{} for _ in range(batch_size)])


def _seconds(run, repeats: int, device: str, reduce=min) -> float:
    """Seconds per ``run()`` over ``repeats`` calls after a warm-up. On the CPU this is the process's
    CPU time, i.e. per-core cost that other jobs on a shared machine cannot inflate (with one torch
    thread); on CUDA it is wall time between synchronisations."""
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    run()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return reduce(times)


def _torch_seconds_per_clip(rawboost: RawBoost, batch: Batch, repeats: int) -> float:
    """Draws included: they are part of the cost of augmenting a batch."""
    device = str(batch.waveforms.device)
    return _seconds(lambda: rawboost(batch, epoch=0), repeats, device) / len(batch)


def _per_clip_seconds(cfg: RawBoostConfig, algo: int, batch: Batch, repeats: int) -> float:
    """Mean over clips: each clip draws its own filter lengths, which set its cost."""
    reference = PerClipRawBoost(cfg, np.random.default_rng(0))
    clips = iter(batch.waveforms.double().numpy().tolist() * (repeats + 1))
    return _seconds(lambda: reference(np.asarray(next(clips)), algo), repeats, "cpu",
                    reduce=lambda times: sum(times) / len(times))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench rawboost", description=__doc__)
    parser.add_argument("--algo", type=int, nargs="+", default=[4, 5], help="RawBoost algorithms (1..8)")
    parser.add_argument("--batch", type=int, default=32, help="clips per batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per clip (16 kHz)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches (the fastest is kept)")
    parser.add_argument("--reference-clips", type=int, default=16, help="clips timed for the per-clip baseline")
    args = parser.parse_args(argv)
    cfg = RawBoostConfig()
    batch = _clips(args.batch, int(args.seconds * cfg.sample_rate_hz), seed=0)
    threads = torch.get_num_threads()
    print(f"rawboost bench: batch {args.batch} x {args.seconds:g} s, device {args.device}, "
          f"torch threads {threads}")
    for algo in args.algo:
        rawboost = RawBoost(cfg, algo=algo)
        torch.set_num_threads(1)
        per_clip_s = _per_clip_seconds(cfg, algo, batch, args.reference_clips)
        torch_one_core_s = _torch_seconds_per_clip(rawboost, batch, args.repeats)
        torch.set_num_threads(threads)
        line = (f"algo {algo}: per-clip scipy {1 / per_clip_s:7.1f} clips/s ({per_clip_s * 1e3:6.1f} ms/clip) | "
                f"torch, 1 thread {1 / torch_one_core_s:7.1f} clips/s ({torch_one_core_s * 1e3:5.2f} ms/clip) | "
                f"speed-up per core {per_clip_s / torch_one_core_s:5.1f}x")
        if args.device != "cpu":
            device_s = _torch_seconds_per_clip(rawboost, batch.to(args.device), args.repeats)
            line += f" | torch {args.device} {1 / device_s:8.1f} clips/s ({device_s * 1e3:6.3f} ms/clip)"
        print(line, flush=True)
    return 0
