"""The rate sweep of outside audio: ``posttrain.data.audio.load`` (probe + bounded streaming decode +
the one resampler) at each input rate, in a fresh process per rate so each peak memory is its own.

Prints per rate: the resampler path, CPU-seconds and peak memory above the imports, both per audio
second, and each as a ratio to the 48 kHz figure (the goal: every ratio within 2x).
``python -m posttrain.bench audio [--seconds 60] [--rates 8000 8001 ...] [--format FLAC]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

RATES_HZ = (8000, 8001, 11025, 16001, 22050, 44100, 44101, 48000, 96000, 192000)
REFERENCE_HZ = 48000

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, soxr, torch, torchaudio  # the imports are not the decode's cost
from posttrain.data import audio
from posttrain.data.resample import resampler_path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

path, repeats = sys.argv[1], int(sys.argv[2])
warm = audio.load(path)  # the first call builds torch's kernels and caches; measured below: later calls
baseline = status("VmRSS")
best = float("inf")
for _ in range(repeats):
    start = time.process_time()
    wave = audio.load(path)
    best = min(best, time.process_time() - start)
    del wave
print(json.dumps({"cpu_s": best, "peak_bytes": status("VmHWM") - baseline, "seconds": warm.seconds,
                  "path": resampler_path(warm.orig_sample_rate_hz)}))
"""


def _measure(path: Path, repeats: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(repeats)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench audio")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio seconds per file")
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES_HZ))
    parser.add_argument("--format", default="FLAC", choices=["FLAC", "WAV"], help="container of the test files")
    parser.add_argument("--repeats", type=int, default=3, help="decodes per rate (the fastest CPU time is kept)")
    args = parser.parse_args(argv)
    rates = sorted(set(args.rates) | {REFERENCE_HZ})
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for rate in rates:
            rng = np.random.default_rng(rate)
            t = np.arange(int(args.seconds * rate)) / rate
            wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
            path = Path(scratch) / f"{rate}.{args.format.lower()}"
            sf.write(path, wave.astype(np.float32), rate, format=args.format, subtype="PCM_16")
            rows[rate] = _measure(path, args.repeats)
            path.unlink()
    ref = rows[REFERENCE_HZ]
    ref_cpu, ref_mem = ref["cpu_s"] / ref["seconds"], ref["peak_bytes"] / ref["seconds"]
    print(f"{args.seconds:g} s of 16-bit mono {args.format} per rate; load = probe + decode + resample to 16 kHz")
    print(f"{'rate Hz':>8}  {'path':<10}  {'CPU ms/audio-s':>14}  {'x 48k':>6}  {'peak KB/audio-s':>15}  {'x 48k':>6}")
    worst = 0.0
    for rate in rates:
        row = rows[rate]
        cpu, mem = row["cpu_s"] / row["seconds"], max(row["peak_bytes"], 0) / row["seconds"]
        worst = max(worst, cpu / ref_cpu, mem / ref_mem)
        print(f"{rate:>8}  {row['path']:<10}  {1000 * cpu:>14.3f}  {cpu / ref_cpu:>6.2f}  {mem / 1024:>15.1f}  "
              f"{mem / ref_mem:>6.2f}")
    print(f"largest ratio to 48 kHz: {worst:.2f} (goal: <= 2)")
    return 0
