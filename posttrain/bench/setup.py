"""``python -m posttrain.bench setup``: peak host RSS per rank of a ZeRO-3 set-up, built in partitions or not.

    python -m posttrain.bench setup                      # xlsr_300m, xlsr_1b, xlsr_2b x world sizes 1, 2 x before, after
    python -m posttrain.bench setup --presets xlsr_2b --world-sizes 2 --paths after --no-sam-step
    python -m posttrain.bench setup --presets --sam-step  # only the xlsr_1b SAM step

Set-up = the model's construction and weight loading, before the optimiser's states are allocated:
the detector is built as ``posttrain.train.trainer.Trainer._build_model`` builds it for a ZeRO-3 bf16 run
(real-size architecture, random init, no download; ``--init-from SPEC``: as a fine-tune builds it from a
model spec, its weights read in), in ``--world-sizes`` spawned ranks (gloo,
``DS_ACCELERATOR=cpu``), one (preset, world size, path) after the other. ``after``: built straight into
its partitions (``train.partitioned_init``, ``posttrain.models.partitioned``); ``before``
(``train.partitioned_init=false``, the former start-up): every rank builds the whole fp32 model, which
DeepSpeed would partition at ``initialize`` (a fine-tune: a full model loaded, then a second one
built and the first's state dict copied in). Per rank: the RSS high-water mark (``VmHWM``, reset first)
above the RSS before the build (interpreter, torch, DeepSpeed: ``base``), and the wall time. Printed next
to ``posttrain plan``'s figures for the same preset and world size: the bf16 ZeRO-3 parameters per GPU
the set-up ends with (2 P / N + 2 L), and the goal of issue 24, 4 P / N + 2 GB.

``--sam-step``: then one SAM step of xlsr_1b at world size 2 (ZeRO-3, bf16, activation checkpointing,
batch 1, a ``--clip-seconds`` clip per rank) after one warm-up step, the engine built as a training run
builds it: peak RSS per rank of the set-up, of the engine and of the steps, the step times, and the
planner's prediction for the step. It needs about 18 bytes per parameter of model states on this CPU (bf16
weights and gradients, fp32 master, gradients and Adam moments), so two ranks only just fit in 24 GiB:
``--sub-group-elements`` bounds the optimiser step's temporaries (DeepSpeed steps its fp32 partition in
sub-groups of that many elements; the planner counts the whole partition) and the reduce bucket is
``--bucket-elements``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from posttrain.bench.fullsize import (clip_batch, peak_rss_bytes, predicted_bytes, reset_peak_rss, rss_bytes,
                                      with_fixed_mmap_threshold)

GB = 1e9  # the goal is stated in GB: 4 P / N + 2 GB
GOAL_MARGIN_BYTES = 2 * GB
PATHS = {"before": "false", "after": "true"}  # -> train.partitioned_init


# ---------------------------------------------------------------------------------------- the ranks


def _config(job: dict):
    from posttrain.config import FinetuneConfig, load_config

    overrides = [f"model.preset={job['preset']}", "train.zero_stage=3", "train.precision=bf16", "train.device=cpu",
                 "model.gradient_checkpointing=true", f"train.partitioned_init={PATHS[job['path']]}",
                 "tracking.enabled=false", "optim.lr=1.0e-6", "schedule.warmup_steps=0", "sam.rho=0.005",
                 f"train.reduce_bucket_elements={job['bucket_elements']}",
                 f"train.allgather_bucket_elements={job['bucket_elements']}"]
    if job.get("sub_group_elements"):
        overrides.append(f"train.deepspeed_overrides={{zero_optimization: {{sub_group_size: {job['sub_group_elements']}}}}}")
    if job.get("init_from"):
        return load_config(None, [*overrides, f"finetune.init_from={job['init_from']}"], cls=FinetuneConfig)
    return load_config(None, overrides)


def build_model(cfg):
    """The detector as ``Trainer._build_model`` builds it for a run without a checkpoint; with
    ``finetune.init_from``, as a fine-tune's does (``FinetuneTrainer._build_model``)."""
    from posttrain.config import layerdrop_conflicts
    from posttrain.models.detector import build_detector
    from posttrain.train.engine_config import builds_in_partitions, deepspeed_config
    from posttrain.train.trainer import seed_everything

    seed_everything(cfg.train.seed)
    zero3 = deepspeed_config(cfg, device_type="cpu") if builds_in_partitions(cfg) else None
    if getattr(cfg, "finetune", None) is not None:
        from posttrain.finetuning import initial_detector
        from posttrain.loading import load_model

        return initial_detector(cfg, None, load_model, zero3=zero3)[0]
    return build_detector(cfg.model, layerdrop_conflicts=layerdrop_conflicts(cfg), layerdrop_seed=cfg.train.seed,
                          zero3=zero3)


def _timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def setup_rank(rank: int, world_size: int, port: int, job: dict, out_dir: str) -> None:
    """One rank: the set-up's peak RSS (and, with ``job["sam_steps"]``, the engine's and the SAM steps')."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(job["threads"])
    import torch.distributed as dist

    from posttrain.dist import start_process_group

    cfg = _config(job)
    start_process_group(torch.device("cpu"), deepspeed=True)
    dist.barrier()
    base = rss_bytes()
    reset_peak_rss()
    model, wall, cpu = _timed(lambda: build_model(cfg))
    result = {"rank": rank, "base_bytes": base, "setup_peak_bytes": peak_rss_bytes() - base, "setup_wall_s": wall,
              "setup_cpu_s": cpu}
    if job["sam_steps"]:
        result.update(_sam_steps(cfg, model, job, base, rank, world_size))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _sam_steps(cfg, model, job: dict, base: int, rank: int, world_size: int) -> dict:
    """The engine as a training run builds it, then one warm-up and ``job["sam_steps"]`` SAM steps."""
    import deepspeed
    import torch.distributed as dist

    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.schedule import build_scheduler
    from posttrain.train.step import StepContext, get_step_mode
    from posttrain.train.trainer import build_optimizer, silence_deepspeed_noise

    reset_peak_rss()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    silence_deepspeed_noise()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, device_type="cpu"))
    engine_peak = peak_rss_bytes() - base
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                      world_size=world_size)
    step_fn = get_step_mode("sam", cfg)
    generator = torch.Generator().manual_seed(rank)
    reset_peak_rss()
    steps = []
    for index in range(1 + job["sam_steps"]):
        batch = clip_batch(job["clip_seconds"], generator)
        dist.barrier()
        ctx.step = index
        stats, wall, cpu = _timed(lambda: step_fn(engine, [batch], ctx))
        steps.append({"wall_s": wall, "cpu_s": cpu, "loss": stats.loss, "skipped": stats.skipped})
    return {"engine_peak_bytes": engine_peak, "step_peak_bytes": peak_rss_bytes() - base, "steps": steps}


def run_job(job: dict, world_size: int) -> list[dict]:
    """Spawn the ranks of one job; their results, by rank."""
    import torch.multiprocessing as mp

    from posttrain.dist import free_port

    with tempfile.TemporaryDirectory(prefix="bench-setup-") as out_dir:
        mp.spawn(setup_rank, args=(world_size, free_port(), job, out_dir), nprocs=world_size, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


# ------------------------------------------------------------------------------------------ planner


def planned(preset: str, world_size: int) -> dict[str, float]:
    """``posttrain plan``'s figures for a ZeRO-3 bf16 run of ``preset`` on ``world_size`` GPUs."""
    from posttrain.train.plan import PlanRequest, memory_breakdown, parameter_counts

    parameters, _ = parameter_counts(preset)
    memory = memory_breakdown(PlanRequest(preset=preset, zero_stage=3, precision="bf16", gpus=world_size))
    return {"parameters": parameters, "parameters_per_gpu_bytes": memory.parameters,
            "model_states_per_gpu_bytes": memory.model_states,
            "goal_bytes": 4 * parameters / world_size + GOAL_MARGIN_BYTES}


# -------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench setup", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=["xlsr_300m", "xlsr_1b", "xlsr_2b"])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=["before", "after"])
    parser.add_argument("--sam-step", action=argparse.BooleanOptionalAction, default=True,
                        help="also one SAM step of xlsr_1b at world size 2 (after one warm-up step)")
    parser.add_argument("--clip-seconds", type=float, default=1.5, help="the SAM step's clip per rank")
    parser.add_argument("--sub-group-elements", type=int, default=100_000_000,
                        help="DeepSpeed's sub_group_size for the SAM step (0: DeepSpeed's default)")
    parser.add_argument("--bucket-elements", type=int, default=50_000_000,
                        help="reduce and all-gather bucket elements for the SAM step")
    parser.add_argument("--init-from", default=None,
                        help="set up as a fine-tune from this model spec (export, checkpoint, AntiDeepfake release) "
                             "instead of a random init; its preset must be each --presets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    with_fixed_mmap_threshold("setup", argv)
    rows = []
    what = f"weights from {args.init_from}" if args.init_from else "random init"
    print(f"ZeRO-3 bf16 set-up (construction, {what}), peak RSS per rank above base, GB (1e9 bytes)")
    print(f"{'preset':<10} {'ws':>2} {'path':<6} {'rank':>4} {'base':>5} {'set-up peak':>11} {'goal 4P/N+2':>11} "
          f"{'plan params/GPU':>15} {'plan states/GPU':>15} {'wall s':>7}  within goal")
    for preset in args.presets:
        for world_size in args.world_sizes:
            plan = planned(preset, world_size)
            for path in args.paths:
                job = {"preset": preset, "path": path, "threads": args.threads, "sam_steps": 0,
                       "bucket_elements": 200_000_000, "init_from": args.init_from}
                for result in run_job(job, world_size):
                    ok = result["setup_peak_bytes"] <= plan["goal_bytes"]
                    print(f"{preset:<10} {world_size:>2} {path:<6} {result['rank']:>4} {_gb(result['base_bytes']):>5} "
                          f"{_gb(result['setup_peak_bytes']):>11} {_gb(plan['goal_bytes']):>11} "
                          f"{_gb(plan['parameters_per_gpu_bytes']):>15} {_gb(plan['model_states_per_gpu_bytes']):>15} "
                          f"{result['setup_wall_s']:>7.1f}  {'yes' if ok else 'NO'}", flush=True)
                    rows.append({**job, "world_size": world_size, **result, **plan})
    if args.sam_step:
        rows += _sam_table(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _sam_table(args: argparse.Namespace) -> list[dict]:
    job = {"preset": "xlsr_1b", "path": "after", "threads": args.threads, "sam_steps": 1,
           "clip_seconds": args.clip_seconds, "sub_group_elements": args.sub_group_elements,
           "bucket_elements": args.bucket_elements}
    prediction = predicted_bytes("xlsr_1b", 3, 2, args.clip_seconds)
    print(f"\nxlsr_1b SAM step, world size 2, ZeRO-3 bf16, activation checkpointing, batch 1 ({args.clip_seconds:g} s "
          f"clip), sub-groups of {args.sub_group_elements:,} elements, buckets of {args.bucket_elements:,}; "
          f"peak RSS per rank above base, GB; planned: model states + unfused AdamW temporaries + bucket + "
          f"activations, no reserve")
    print(f"{'rank':>4} {'set-up':>7} {'engine':>7} {'steps':>7} {'planned':>8} {'warm-up s (cpu)':>16} "
          f"{'SAM step s (cpu)':>17}  loss")
    rows = []
    for result in run_job(job, 2):
        warm, timed = result["steps"][0], result["steps"][-1]
        print(f"{result['rank']:>4} {_gb(result['setup_peak_bytes']):>7} {_gb(result['engine_peak_bytes']):>7} "
              f"{_gb(result['step_peak_bytes']):>7} {_gb(prediction):>8} "
              f"{warm['wall_s']:>8.1f} ({warm['cpu_s']:>5.1f}) {timed['wall_s']:>9.1f} ({timed['cpu_s']:>5.1f})  "
              f"{timed['loss']:.4f}", flush=True)
        rows.append({**job, "world_size": 2, **result, "planned_bytes": prediction, "unit": "bytes"})
    return rows
