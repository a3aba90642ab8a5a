"""``python -m posttrain.bench fullsize``: the real presets trained on the CPU, peak memory per rank.

    python -m posttrain.bench fullsize                         # xlsr_300m, world size 2, ZeRO-2 and 3
    python -m posttrain.bench fullsize --presets xlsr_1b --stages 3 --world-size 1 --modes plain --forward-backward-only
    python -m posttrain.bench fullsize --activations           # fit the planner's activation factor

Each (preset, ZeRO stage) runs in a fresh process group of ``--world-size`` spawned ranks (gloo,
``DS_ACCELERATOR=cpu``), built as training builds it (``posttrain.train.trainer``: the detector, the
client AdamW, the generated DeepSpeed config) with bf16 and activation checkpointing, then ``--steps``
plain and SAM steps of the real step modes (after one warm-up step each) on one random clip per rank
per step, 4 s on one rank and 8 s on the other, alternating. Per rank it records the RSS high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` between phases) of the engine set-up and of
the steps, above the RSS before the model is built (interpreter, torch, DeepSpeed: ``base``), and prints them next to the planner's prediction (``posttrain.train.plan``: model states
for the same stage, world size and precision, plus activations of the longest clip, no reserve).

``--forward-backward-only`` (for presets whose AdamW states do not fit this machine, xlsr_1b: 16 bytes
per parameter): the model is built directly in bf16 and only forward + backward run (gradients
reduced into the ZeRO partitions; no optimiser step, so Adam's moments are never allocated; the
prediction then leaves them and the update's temporaries out).

``--activations``: one process, no DeepSpeed, a bf16 detector, forward + backward of one clip of
4 s then of 8 s with and without activation checkpointing; prints the peak-RSS slope in bytes per
audio-second and the factor over the planner's element count (``plan.ACTIVATION_FIT``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SAMPLE_RATE_HZ = 16000
GIB = 2**30
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


# ------------------------------------------------------------------------------------------ memory


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


# ---------------------------------------------------------------------------------------- the ranks


def _overrides(preset: str, stage: int) -> list[str]:
    return [f"model.preset={preset}", f"train.zero_stage={stage}", "train.precision=bf16", "train.device=cpu",
            "model.gradient_checkpointing=true", "optim.lr=1.0e-6", "schedule.warmup_steps=0",
            "tracking.enabled=false", "sam.rho=0.005"]


def clip_batch(seconds: float, generator: torch.Generator):
    from posttrain.data.batch import Batch

    samples = round(seconds * SAMPLE_RATE_HZ)
    return Batch(0.1 * torch.randn(1, samples, generator=generator), torch.tensor([samples]),
                 torch.randint(0, 2, (1,), generator=generator), ["bench"], [{}])


def build_engine(cfg, *, bf16_build: bool = False):
    """(model, optimizer, scheduler, engine) as ``Trainer`` builds them; ``bf16_build``: construct the
    detector directly in bf16 (half the construction peak; the benchmark's forward/backward-only mode)."""
    import deepspeed

    from posttrain.models.detector import build_detector
    from posttrain.train.trainer import build_optimizer, seed_everything
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.schedule import build_scheduler

    seed_everything(cfg.train.seed)
    default = torch.get_default_dtype()
    if bf16_build:
        torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_detector(cfg.model)
    finally:
        torch.set_default_dtype(default)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return model, optimizer, scheduler, engine


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_rank(rank: int, world_size: int, port: int, job: dict, out_dir: str) -> None:
    """One rank of one (preset, stage) job; writes ``rank{r}.json`` into ``out_dir``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(job["threads"])
    from posttrain.config import load_config
    from posttrain.dist import start_process_group
    from posttrain.train.step import StepContext, get_step_mode

    cfg = load_config(None, _overrides(job["preset"], job["stage"]))
    start_process_group(torch.device("cpu"), deepspeed=True)
    import torch.distributed as dist

    base = rss_bytes()  # interpreter, torch, DeepSpeed: not what the planner counts
    reset_peak_rss()
    model, optimizer, scheduler, engine = build_engine(cfg, bf16_build=job["forward_backward_only"])
    result = {"rank": rank, "parameters": sum(p.numel() for p in model.parameters()), "base_bytes": base,
              "init_peak_bytes": peak_rss_bytes() - base, "steps": {}}
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                      world_size=world_size)
    generator = torch.Generator().manual_seed(rank)
    reset_peak_rss()
    for mode in job["modes"]:
        walls, cpus, losses = [], [], []
        for index in range(1 + job["steps"]):
            seconds = job["clip_seconds"][(index + rank) % len(job["clip_seconds"])]
            batch = clip_batch(seconds, generator)
            dist.barrier()
            if job["forward_backward_only"]:
                from posttrain.train.step import forward_backward, global_counts, loss_scale, prepare

                def run() -> None:
                    batches = prepare(ctx, [batch])
                    samples, _ = global_counts(ctx, batches)
                    losses.append(float(forward_backward(engine, batches, loss_scale(ctx, samples), ctx)))
                    engine.optimizer.zero_grad()
            else:
                step_fn = get_step_mode(mode)

                def run() -> None:
                    ctx.step = index
                    losses.append(step_fn(engine, [batch], ctx).loss)
            wall, cpu = _timed(run)
            if index:  # the first step of each mode warms up
                walls.append(wall)
                cpus.append(cpu)
        dist.barrier()
        result["steps"][mode] = {"wall_s": walls, "cpu_s": cpus, "loss": losses[-1],
                                 "peak_bytes": peak_rss_bytes() - base}
        reset_peak_rss()
    result["step_peak_bytes"] = max(s["peak_bytes"] for s in result["steps"].values())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_job(job: dict, world_size: int) -> list[dict]:
    """Spawn the ranks of one job; their results, by rank."""
    import torch.multiprocessing as mp

    from posttrain.dist import free_port

    with tempfile.TemporaryDirectory(prefix="bench-fullsize-") as out_dir:
        mp.spawn(run_rank, args=(world_size, free_port(), job, out_dir), nprocs=world_size, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def predicted_bytes(preset: str, stage: int, world_size: int, clip_seconds: float, *,
                    optimizer_states: bool = True) -> float:
    """The planner's model states, reduce bucket, unfused AdamW temporaries (the CPU's) and activations
    of one clip (no CUDA reserve). ``optimizer_states=False``: no step ever runs (no moments, no update)."""
    from posttrain.config import TrainConfig
    from posttrain.train.plan import PlanRequest, memory_breakdown

    request = PlanRequest(preset=preset, zero_stage=stage, gpus=world_size, batch_seconds=clip_seconds,
                          gradient_checkpointing=True, reserve_gib=0.0, overlap_comm=False,  # off on CPU
                          reduce_bucket_elements=TrainConfig().reduce_bucket_elements, fused_adamw=False)
    memory = memory_breakdown(request)
    # without a step: no Adam moments (8 of the 12 optimiser bytes per parameter; the fp32 master
    # partition exists from the start) and no update temporaries
    no_step = memory.optimizer_states * 8 / 12 + memory.optimizer_step_transient
    return memory.total - (0.0 if optimizer_states else no_step)


# ------------------------------------------------------------------------------------- activations


def measure_activations(preset: str, clip_seconds: list[float], threads: int) -> list[dict]:
    """Peak RSS above the pre-forward RSS of one bf16 forward + backward, per (checkpointing, clip)."""
    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    torch.set_num_threads(threads)
    rows = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = build_detector(ModelConfig(preset=preset, gradient_checkpointing=checkpointing)).train()
        finally:
            torch.set_default_dtype(default)
        generator = torch.Generator().manual_seed(0)
        for seconds in [clip_seconds[0], *clip_seconds]:  # the first run warms up the allocator
            batch = clip_batch(seconds, generator)
            model.zero_grad(set_to_none=False)  # gradients allocated before the baseline
            base = rss_bytes()
            reset_peak_rss()
            loss = model.sample_losses(model(batch.waveforms, batch.lengths), batch.labels).mean()
            loss.backward()
            rows.append({"checkpointing": checkpointing, "clip_seconds": seconds,
                         "peak_above_base_bytes": peak_rss_bytes() - base})
        rows.pop(-len(clip_seconds) - 1)  # drop the warm-up row
        del model
    return rows


def activation_fit(preset: str, rows: list[dict]) -> dict[bool, dict[str, float]]:
    """Per checkpointing setting: bytes per audio-second (slope between the shortest and longest clip)
    and that slope over the planner's element count x 2 bytes (bf16)."""
    from posttrain.train.plan import activation_elements_per_second

    fits = {}
    for checkpointing in (True, False):
        mine = sorted((r for r in rows if r["checkpointing"] == checkpointing), key=lambda r: r["clip_seconds"])
        short, long = mine[0], mine[-1]
        slope = (long["peak_above_base_bytes"] - short["peak_above_base_bytes"]) / (long["clip_seconds"] - short["clip_seconds"])
        counted = 2 * activation_elements_per_second(preset, checkpointing, long["clip_seconds"])
        fits[checkpointing] = {"bytes_per_second": slope, "factor": slope / counted}
    return fits


# -------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench fullsize", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["xlsr_300m"])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["plain", "sam"])
    parser.add_argument("--clip-seconds", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--forward-backward-only", action="store_true")
    parser.add_argument("--activations", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def with_fixed_mmap_threshold(bench: str, argv: list[str]) -> None:
    """Re-run ``python -m posttrain.bench BENCH ARGV`` with a fixed mmap threshold (once; returns when it
    is set). glibc keeps freed heap memory (e.g. the fp32 weights DeepSpeed replaced by bf16 ones) in the
    RSS as holes, and hides later reuse: a fixed threshold returns every large tensor to the system on
    free, so the peak RSS is what the tensors need (it must be set before the process starts)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if MMAP_THRESHOLD_ENV not in os.environ:
        os.environ[MMAP_THRESHOLD_ENV] = "65536"
        os.execv(sys.executable, [sys.executable, "-m", "posttrain.bench", bench, *argv])


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    with_fixed_mmap_threshold("fullsize", argv)
    if args.activations:
        report = {}
        for preset in args.presets:
            rows = measure_activations(preset, sorted(args.clip_seconds), args.threads)
            fits = activation_fit(preset, rows)
            report[preset] = {"rows": rows, "fit": {str(k): v for k, v in fits.items()}}
            for row in rows:
                print(f"{preset}  checkpointing {str(row['checkpointing']):<5}  clip {row['clip_seconds']:4.1f} s  "
                      f"peak above base {row['peak_above_base_bytes'] / 2**20:8.1f} MiB")
            for checkpointing, fit in fits.items():
                print(f"{preset}  checkpointing {str(checkpointing):<5}  {fit['bytes_per_second'] / 2**20:7.2f} MiB per "
                      f"audio-second, factor over counted elements {fit['factor']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0

    rows = []
    print(f"world size {args.world_size}, bf16, activation checkpointing, clips {args.clip_seconds} s, "
          f"{args.threads} thread(s) per rank; times are medians of {args.steps} steps after one warm-up")
    print(f"{'preset':<10} {'stage':>5} {'rank':>4} {'base GiB':>8} {'init peak GiB':>13} {'step peak GiB':>13} {'planned GiB':>11} "
          f"{'error':>7}  " + "  ".join(f"{mode + ' s (cpu s)':>18}" for mode in args.modes) + "  sam/plain")
    for preset in args.presets:
        for stage in args.stages:
            job = {"preset": preset, "stage": stage, "modes": args.modes, "clip_seconds": args.clip_seconds,
                   "steps": args.steps, "threads": args.threads, "forward_backward_only": args.forward_backward_only}
            results = run_job(job, args.world_size)
            planned = predicted_bytes(preset, stage, args.world_size, max(args.clip_seconds),
                                      optimizer_states=not args.forward_backward_only)
            for result in results:
                times = {mode: statistics.median(s["wall_s"]) for mode, s in result["steps"].items()}
                cpus = {mode: statistics.median(s["cpu_s"]) for mode, s in result["steps"].items()}
                ratio = times["sam"] / times["plain"] if {"sam", "plain"} <= times.keys() else float("nan")
                error = (planned - result["step_peak_bytes"]) / result["step_peak_bytes"]
                by_mode = ", ".join(f"{m} {s['peak_bytes'] / GIB:.2f}" for m, s in result["steps"].items())
                print(f"{preset:<10} {stage:>5} {result['rank']:>4} {result['base_bytes'] / GIB:>8.2f} {result['init_peak_bytes'] / GIB:>13.2f} "
                      f"{result['step_peak_bytes'] / GIB:>13.2f} {planned / GIB:>11.2f} {100 * error:>6.1f}%  "
                      + "  ".join(f"{times[m]:>8.1f} ({cpus[m]:>6.1f})" for m in args.modes) + f"  {ratio:9.2f}"
                      + f"  (step peak GiB: {by_mode})",
                      flush=True)
                rows.append({**job, **result, "planned_bytes": planned})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
