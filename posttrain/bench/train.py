"""Training throughput: audio-seconds/s, step time, peak memory and model-FLOPs utilisation.

    python -m posttrain.bench train --preset tiny --device cpu --steps 10
    python -m posttrain.bench train --preset xlsr_1b --seconds-per-batch 100 --zero-stage 2 --gradient-checkpointing

Runs the real training step (``posttrain.train.step``'s plain mode) inside a DeepSpeed engine built
exactly as training builds it (``posttrain.train.trainer``: DeepSpeed config, AdamW, schedule), in
one process, on random audio batches of ``--seconds-per-batch`` seconds cut into equal clips.
MFU = analytic model FLOPs (``posttrain.train.flops``, 3 x forward) per second / peak FLOP/s.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from posttrain.config import SAMPLE_RATE_HZ, load_config
from posttrain.data.batch import Batch

# dense bf16 tensor-core peaks (TFLOP/s, SXM parts); other devices: --peak-tflops or a measured matmul
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
BENCH_PRESETS = ("tiny", "wav2vec2_small", "xlsr_300m", "xlsr_1b", "xlsr_2b")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=BENCH_PRESETS)
    parser.add_argument("--seconds-per-batch", type=float, default=100.0, help="audio seconds per step")
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak; default: known bf16 GPU peak, else a measured matmul peak")
    return parser.parse_args(argv)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """Best-of-``repeats`` square matmul throughput: the practical peak of this device and dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for model, tflops in BF16_PEAK_TFLOPS.items():
            if model in name:
                return tflops, f"{model} dense bf16 datasheet"
    size = 1024 if device.type == "cpu" else 8192
    # a CPU without bf16 matrix units runs bf16 matmuls far below fp32 (and the model's bf16 convs
    # may go through faster kernels): the peak is the better of the two
    dtypes = {dtype, torch.float32} if device.type == "cpu" else {dtype}
    tflops, best = max((measured_matmul_tflops(device, d, size), d) for d in dtypes)
    return tflops, f"measured {size}^3 {str(best).removeprefix('torch.')} matmul"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(args: argparse.Namespace, generator: torch.Generator) -> Batch:
    clips = max(1, round(args.seconds_per_batch / args.clip_seconds))
    num_samples = round(args.clip_seconds * SAMPLE_RATE_HZ)
    waveforms = torch.randn(clips, num_samples, generator=generator)
    return Batch(waveforms, torch.full((clips,), num_samples, dtype=torch.long),
                 torch.randint(0, 2, (clips,), generator=generator), [f"bench-{i}" for i in range(clips)],
                 [{} for _ in range(clips)])


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "allocated by torch"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # ru_maxrss: KiB


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = load_config(None, [f"model.preset={args.preset}", f"train.precision={args.precision}",
                             f"train.zero_stage={args.zero_stage}", f"train.device={args.device}",
                             f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                             "optim.lr=1.0e-6", "schedule.warmup_steps=0", "tracking.enabled=false"])
    # imported after the config so DS_ACCELERATOR is set (by start_process_group) before DeepSpeed loads
    from posttrain.models.detector import build_detector, count_parameters
    from posttrain.dist import choose_device, start_process_group
    from posttrain.train.trainer import build_optimizer, seed_everything
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.flops import training_flops_per_audio_second
    from posttrain.train.schedule import build_scheduler
    from posttrain.train.step import StepContext, get_step_mode

    device = choose_device(cfg.train.device)
    start_process_group(device, deepspeed=True)
    import deepspeed

    seed_everything(cfg.train.seed)
    model = build_detector(cfg.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=device, world_size=1)
    step = get_step_mode("plain")
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(args, generator) for _ in range(2)]

    durations = []
    for index in range(args.warmup_steps + args.steps):
        ctx.step = index
        _sync(device)
        start = time.perf_counter()
        stats = step(engine, [batches[index % 2]], ctx)
        _sync(device)
        if index >= args.warmup_steps:
            durations.append(time.perf_counter() - start)
    audio_seconds = float(batches[0].lengths.sum()) / SAMPLE_RATE_HZ

    step_s = sorted(durations)[len(durations) // 2]
    audio_per_s = audio_seconds / step_s
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, peak_source = peak_tflops(args, device, dtype)
    ssl_config = model.encoder.config
    model_tflops = training_flops_per_audio_second(ssl_config, args.clip_seconds) * audio_per_s / 1e12
    hardware_tflops = training_flops_per_audio_second(ssl_config, args.clip_seconds,
                                                      recompute=args.gradient_checkpointing) * audio_per_s / 1e12
    memory, memory_kind = peak_memory_gib(device)
    rows = [
        ("preset", f"{args.preset} ({count_parameters(model):,} parameters)"),
        ("device", f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"),
        ("setting", f"{args.precision}, ZeRO-{args.zero_stage}, gradient checkpointing {args.gradient_checkpointing}, "
                    f"{len(batches[0])} clips x {args.clip_seconds:g} s per step"),
        ("step time", f"{step_s * 1e3:.1f} ms (median of {len(durations)}; min {min(durations) * 1e3:.1f}, "
                      f"max {max(durations) * 1e3:.1f}); last loss {stats.loss:.4f}"),
        ("throughput", f"{audio_per_s:.1f} audio-seconds/s ({audio_per_s:.1f} audio-hours per device-hour)"),
        ("model FLOPs", f"{training_flops_per_audio_second(ssl_config, args.clip_seconds) / 1e9:.2f} GFLOP per "
                        f"audio-second trained; achieved {model_tflops:.3f} TFLOP/s"),
        ("peak", f"{peak:.3f} TFLOP/s ({peak_source})"),
        ("MFU", f"{100 * model_tflops / peak:.2f} %"
                + (f" (hardware FLOPs incl. recompute: {100 * hardware_tflops / peak:.2f} %)"
                   if args.gradient_checkpointing else "")),
        ("peak memory", f"{memory:.2f} GiB ({memory_kind})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
