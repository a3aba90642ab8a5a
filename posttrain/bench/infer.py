"""``python -m posttrain.bench infer``: CPU inference speed, torch eager vs onnxruntime fp32 vs int8.

For each preset (random init; default ``tiny`` and ``xlsr_300m``), each thread count and each input length,
one raw input at batch 1, whole and (when longer than one) in ``posttrain score``'s windows, one pass per
window as ``score`` runs them, after a warm-up pass:
the real-time factor (compute seconds per audio second; below 1 is faster than real time) and the audio
seconds per core-second (audio seconds / (wall seconds x threads)). The ONNX graphs are exported here
(``posttrain.hub.onnx_export``) into a temporary folder. The CPU's model name and its AVX-512 / VNNI flags
(``/proc/cpuinfo``, ``posttrain.eval.int8_check.cpu``) come first: int8 speed-ups depend on VNNI.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from posttrain.eval.int8_check import cpu, cpu_text
from posttrain.eval.scoring import WindowConfig

# the ONNX graph materialises [heads, frames, frames] float32 attention tensors (torch's sdpa does not): a cell
# needing more than this per tensor is skipped (the tiny preset's 20-sample stride gives 48,000 frames a minute)
MAX_ATTENTION_BYTES = 2 << 30


def _time(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def bench_preset(preset: str, threads: list[int], seconds: list[float], folder: Path, repeats: int) -> list[dict]:
    import torch

    from posttrain.config import ModelConfig
    from posttrain.eval.onnx_runtime import OnnxModel
    from posttrain.hub.export import identity_document
    from posttrain.hub.onnx_export import export_onnx
    from posttrain.models.detector import build_detector

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset=preset)).eval()
    started = time.perf_counter()
    out = export_onnx(detector, folder / preset, identity_document(detector, preset=preset), quantize="int8")
    print(f"{preset}: exported fp32 + int8 in {time.perf_counter() - started:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    window = WindowConfig()  # posttrain score's windows: a long file is scored as these, one pass each
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        runners = {"onnx fp32": OnnxModel(out, threads=count), "onnx int8": OnnxModel(out, threads=count, int8=True)}
        for length in seconds:
            wave = (0.1 * rng.standard_normal(int(length * 16000))).astype(np.float32)
            spans = window.spans(wave.size)
            cuts = {"whole": [wave]}
            if len(spans) > 1:
                cuts[f"{window.window_seconds:g} s windows"] = [wave[start:stop] for start, stop in spans]
            for scored_as, pieces in cuts.items():
                rows += _bench_cell(detector, runners, pieces, preset=preset, threads=count, seconds=length,
                                    scored_as=scored_as, repeats=repeats)
    return rows


def _bench_cell(detector, runners: dict, pieces: list[np.ndarray], *, preset: str, threads: int, seconds: float,
                scored_as: str, repeats: int) -> list[dict]:
    """Every backend on one input, given as ``pieces`` (the whole file, or its windows) run one after another."""
    import torch

    from posttrain.models.backbones.wav2vec2 import conv_output_lengths

    def eager() -> None:
        with torch.inference_mode():
            for piece in pieces:
                tensor, lengths = torch.from_numpy(piece)[None], torch.tensor([piece.size])
                detector(detector.normalise(tensor, lengths), lengths)

    backends = {"torch eager": eager, **{name: (lambda model=model: [model.logits([piece]) for piece in pieces])
                                         for name, model in runners.items()}}
    frames = conv_output_lengths(detector.ssl_config, max(piece.size for piece in pieces))[-1]
    attention = frames * frames * detector.ssl_config.num_attention_heads * 4
    rows = []
    for name, run in backends.items():
        label = f"{preset:<10} {name:<12} threads {threads}  {seconds:>4g} s {scored_as:<13}"
        if name != "torch eager" and attention > MAX_ATTENTION_BYTES:
            print(f"  {label} skipped: {frames} frames, {attention / 2**30:.0f} GiB per attention tensor", flush=True)
            continue
        run()  # warm-up: allocations, thread pools
        wall = _time(run, repeats)
        rows.append({"preset": preset, "backend": name, "threads": threads, "seconds": seconds, "scored_as": scored_as,
                     "wall_s": wall, "rtf": wall / seconds, "audio_s_per_core_s": seconds / (wall * threads)})
        print(f"  {label} wall {wall:8.3f} s  RTF {wall / seconds:.4f}  audio s per core-s "
              f"{seconds / (wall * threads):8.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| preset | backend | threads | input (s) | scored as | wall (s) | RTF | audio s / core-s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['backend']} | {r['threads']} | {r['seconds']:g} | {r['scored_as']} | {r['wall_s']:.3f} | "
              f"{r['rtf']:.4f} | {r['audio_s_per_core_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench infer", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "xlsr_300m"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seconds", nargs="+", type=float, default=[4.0, 60.0])
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per cell (the fastest is shown)")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_text(cpu())}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-infer-") as folder:
        for preset in args.presets:
            rows += bench_preset(preset, args.threads, args.seconds, Path(folder), args.repeats)
    print(table(rows))
    return 0
