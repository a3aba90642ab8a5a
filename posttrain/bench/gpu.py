"""``python -m posttrain.bench gpu``: the one GPU benchmark, a table in under 8 minutes on one H100/H200.

    python -m posttrain.bench gpu                              # xlsr_300m, xlsr_1b, xlsr_2b on cuda:0
    python -m posttrain.bench gpu --device cpu --presets tiny  # dry run of the machinery (tests, laptops)

Per preset, in a fresh process (so peak memory is that preset's own): the detector built as training
builds it (``posttrain.train.trainer``: generated DeepSpeed config with overlap_comm and buckets, fused
AdamW, the configured attention kernel) with bf16 and activation checkpointing, under the preset's
ZeRO stage (``PRESET_RUNS``: 300M and 1B ZeRO-2, 2B ZeRO-3) at AntiDeepfake's batch budgets (100
padded audio-seconds per GPU, 50 for 2B) of 4 s clips, then ``--steps`` plain and SAM steps of the
real step modes after warm-up. Printed per preset: median step time, audio-seconds/s, MFU (analytic
model FLOPs, 3 x forward, ``posttrain.train.flops``, over the dense bf16 peak), the peak memory
(``max_memory_allocated``, and reserved) next to the planner's prediction for the same run
(``posttrain.train.plan``, without its fixed reserve), and the SAM/plain step ratio. Then RawBoost
(algo 5, batched on the device) clips/s and the loader's feed rate (audio-seconds/s of ``ShardStream``
with 2 workers over a synthetic shard set, against what the fastest preset consumes).

Goals: MFU >= 40 % for xlsr_1b, SAM <= 2.05 x plain, RawBoost >= 2,000 clips/s.
Without a CUDA device the benchmark refuses (exit 2) unless ``--device cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# preset -> (ZeRO stage, padded audio-seconds per micro-batch): AntiDeepfake's budgets per GPU
PRESET_RUNS = {"xlsr_300m": (2, 100.0), "xlsr_1b": (2, 100.0), "xlsr_2b": (3, 50.0), "tiny": (2, 4.0)}
GOALS = {"mfu_xlsr_1b": 0.40, "sam_ratio": 2.05, "rawboost_clips_per_s": 2000.0}
SAMPLE_RATE_HZ = 16000
GIB = 2**30


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _overrides(preset: str, stage: int, device: str) -> list[str]:
    return [f"model.preset={preset}", f"train.zero_stage={stage}", "train.precision=bf16", f"train.device={device}",
            "model.gradient_checkpointing=true", "optim.lr=1.0e-6", "schedule.warmup_steps=0",
            "tracking.enabled=false", "sam.rho=0.005"]


def measure_preset(preset: str, device_name: str, steps: int, warmup: int, clip_seconds: float,
                   batch_seconds: float | None) -> dict:
    """Runs in the child process: plain and SAM steps of one preset; returns the measured row."""
    import deepspeed
    import torch

    from posttrain.bench.train import peak_tflops
    from posttrain.config import load_config
    from posttrain.data.batch import Batch
    from posttrain.models.detector import build_detector
    from posttrain.dist import choose_device, start_process_group
    from posttrain.train.trainer import build_optimizer
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.flops import training_flops_per_audio_second
    from posttrain.train.plan import PlanRequest, memory_breakdown
    from posttrain.train.schedule import build_scheduler
    from posttrain.train.step import StepContext, get_step_mode

    stage, default_seconds = PRESET_RUNS.get(preset, (2, 100.0))
    batch_seconds = batch_seconds or default_seconds
    cfg = load_config(None, _overrides(preset, stage, device_name))
    device = choose_device(cfg.train.device)
    start_process_group(device, deepspeed=True)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: minutes saved for 2B on the host
        model = build_detector(cfg.model)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    ds_config = deepspeed_config(cfg, device_type=device.type)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=device, world_size=1)
    clips = max(1, round(batch_seconds / clip_seconds))
    samples = round(clip_seconds * SAMPLE_RATE_HZ)
    generator = torch.Generator().manual_seed(0)
    batch = Batch(0.1 * torch.randn(clips, samples, generator=generator), torch.full((clips,), samples),
                  torch.randint(0, 2, (clips,), generator=generator), [f"b{i}" for i in range(clips)],
                  [{} for _ in range(clips)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {}
    for mode in ("plain", "sam"):
        step_fn = get_step_mode(mode)
        times[mode] = []
        for index in range(warmup + steps):
            ctx.step = index
            _sync(device)
            started = time.perf_counter()
            step_fn(engine, [batch], ctx)
            _sync(device)
            if index >= warmup:
                times[mode].append(time.perf_counter() - started)
    plain, sam = statistics.median(times["plain"]), statistics.median(times["sam"])
    audio_seconds = clips * clip_seconds
    peak, peak_source = peak_tflops(argparse.Namespace(peak_tflops=None), device, torch.bfloat16)
    flops = training_flops_per_audio_second(model.encoder.config, clip_seconds) * audio_seconds
    request = PlanRequest(preset=preset, zero_stage=stage, gpus=1, batch_seconds=audio_seconds,
                          clip_seconds=clip_seconds, sam=True, gradient_checkpointing=True, reserve_gib=0.0,
                          overlap_comm=ds_config["zero_optimization"]["overlap_comm"],
                          reduce_bucket_elements=cfg.train.reduce_bucket_elements,
                          allgather_bucket_elements=cfg.train.allgather_bucket_elements,
                          fused_adamw=bool(optimizer.defaults.get("fused")))
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:
        import resource

        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"preset": preset, "stage": stage, "clips": clips, "audio_seconds": audio_seconds,
            "plain_step_s": plain, "sam_step_s": sam, "audio_per_s": audio_seconds / plain,
            "mfu": flops / plain / (peak * 1e12), "peak_tflops": peak, "peak_source": peak_source,
            "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved,
            "planned_bytes": memory_breakdown(request).total,
            "overlap_comm": ds_config["zero_optimization"]["overlap_comm"],
            "attention": model.encoder.config._attn_implementation, "fused_adamw": bool(optimizer.defaults.get("fused"))}


def rawboost_clips_per_s(device_name: str, clips: int = 256, clip_seconds: float = 4.0, repeats: int = 3) -> float:
    """Batched RawBoost (algo 5, the post-training default) on the device: best of ``repeats``."""
    import torch

    from posttrain.augment.rawboost import RawBoost
    from posttrain.config import RawBoostConfig
    from posttrain.data.batch import Batch

    device = torch.device(device_name)
    samples = round(clip_seconds * SAMPLE_RATE_HZ)
    waves = 0.1 * torch.randn(clips, samples, generator=torch.Generator().manual_seed(0))
    batch = Batch(waves, torch.full((clips,), samples), torch.zeros(clips, dtype=torch.long),
                  [f"c{i}" for i in range(clips)], [{} for _ in range(clips)]).to(device)
    rawboost = RawBoost(RawBoostConfig(enabled=True, algo=5))
    best = float("inf")
    for epoch in range(repeats + 1):  # the first call warms up (kernels, filter design caches)
        _sync(device)
        started = time.perf_counter()
        rawboost(batch, epoch)
        _sync(device)
        if epoch:
            best = min(best, time.perf_counter() - started)
    return clips / best


def loader_feed_rate(files: int, seconds: float, workers: int) -> float:
    """Audio-seconds per wall second the training loader delivers (synthetic shards, crop none)."""
    from posttrain.bench.data import build_set, loader

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        directory = build_set(Path(scratch), "feed", [seconds] * files)
        loader([directory], workers, "none")  # page cache and worker start warm-up
        audio, _, wall, _ = loader([directory], workers, "none")
    return audio / wall


def _child(args: argparse.Namespace, preset: str) -> dict:
    command = [sys.executable, "-m", "posttrain.bench", "gpu", "--_child", preset, *args.passthrough]
    env = dict(os.environ)
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.preset_timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"bench gpu: {preset} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["xlsr_300m", "xlsr_1b", "xlsr_2b"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--batch-seconds", type=float, default=None, help="override the per-preset budget")
    parser.add_argument("--rawboost-clips", type=int, default=256)
    parser.add_argument("--loader-files", type=int, default=96)
    parser.add_argument("--loader-seconds", type=float, default=8.0)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--preset-timeout-s", type=float, default=240.0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def check_device(device: str) -> str | None:
    """Why the benchmark cannot run on ``device`` (None: it can)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return ("bench gpu: no CUDA device is visible; run it on a GPU machine, or pass "
                "`--device cpu --presets tiny` for a dry run of the machinery")
    return None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args._child:
        row = measure_preset(args._child, args.device, args.steps, args.warmup, args.clip_seconds, args.batch_seconds)
        print(json.dumps(row))
        return 0
    problem = check_device(args.device)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    args.passthrough = [a for a in argv if a != "--_child"]
    started = time.perf_counter()
    rows = []
    print(f"{'preset':<10} {'ZeRO':>4} {'batch s':>7} {'step s':>7} {'audio-s/s':>9} {'MFU':>6} "
          f"{'peak GiB':>8} {'reserved':>8} {'planned':>8} {'SAM/plain':>9}  settings")
    for preset in args.presets:
        row = _child(args, preset)
        rows.append(row)
        print(f"{preset:<10} {row['stage']:>4} {row['audio_seconds']:>7.0f} {row['plain_step_s']:>7.3f} "
              f"{row['audio_per_s']:>9.0f} {100 * row['mfu']:>5.1f}% {row['peak_allocated_bytes'] / GIB:>8.2f} "
              f"{row['peak_reserved_bytes'] / GIB:>8.2f} {row['planned_bytes'] / GIB:>8.2f} "
              f"{row['sam_step_s'] / row['plain_step_s']:>9.3f}  attention {row['attention']}, overlap_comm "
              f"{row['overlap_comm']}, fused AdamW {row['fused_adamw']}", flush=True)
    print(f"peak FLOP/s: {rows[0]['peak_tflops']:.1f} TFLOP/s ({rows[0]['peak_source']})" if rows else "")
    clips_per_s = rawboost_clips_per_s(args.device, args.rawboost_clips, args.clip_seconds)
    print(f"RawBoost algo 5 on {args.device}: {clips_per_s:,.0f} clips/s of {args.clip_seconds:g} s "
          f"(goal >= {GOALS['rawboost_clips_per_s']:,.0f})")
    feed = loader_feed_rate(args.loader_files, args.loader_seconds, args.loader_workers)
    fastest = max((row["audio_per_s"] for row in rows), default=0.0)
    print(f"loader feed rate ({args.loader_workers} workers): {feed:,.0f} audio-s/s; fastest preset consumes "
          f"{fastest:,.0f} audio-s/s ({feed / fastest if fastest else float('inf'):.1f}x headroom per GPU process)")
    for row in rows:
        if row["preset"] == "xlsr_1b":
            print(f"goal MFU xlsr_1b >= {100 * GOALS['mfu_xlsr_1b']:.0f} %: {100 * row['mfu']:.1f} %")
    ratios = [row["sam_step_s"] / row["plain_step_s"] for row in rows]
    if ratios:
        print(f"goal SAM/plain <= {GOALS['sam_ratio']}: worst {max(ratios):.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"presets": rows, "rawboost_clips_per_s": clips_per_s,
                                               "loader_audio_per_s": feed}, indent=1))
    return 0
