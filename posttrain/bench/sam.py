"""``python -m posttrain.bench sam``: cost of a SAM / LookSAM / ESAM step relative to a plain step.

For ZeRO-2 and ZeRO-3, one DeepSpeed engine per (stage, mode) in its own process (world size 1,
so peak memory is the mode's own): plain, SAM, ASAM, LookSAM (k = ``--looksam-every``) and ESAM
(``--esam-weights`` of the weights perturbed, ``--esam-data`` of the samples in the second pass)
steps of the real step modes on random audio batches. Prints the mean step time (CPU time of the
process with one torch thread on CPU, so the ratio holds on a shared machine; wall time on CUDA),
its ratio to plain, the peak memory (CPU: peak RSS; CUDA: ``max_memory_allocated``) and its
difference to plain, and the bytes SAM holds on top of plain (restore copy + LookSAM direction).
Goals: SAM <= 2.05x plain, LookSAM <= 1.3x. ESAM's floor is (F + B) + F + gamma (F + B) per step (F, B:
forward and backward cost): about 1.7x plain at gamma 0.5 when B = 2F, less with activation
recomputation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from posttrain.config import SAMPLE_RATE_HZ

MODES = ("plain", "sam", "asam", "looksam", "esam")


def _overrides(args: argparse.Namespace, stage: int, mode: str) -> list[str]:
    return [f"train.zero_stage={stage}", f"train.precision={args.precision}", f"train.device={args.device}",
            f"model.preset={args.preset}", f"train.grad_accum_steps={args.grad_accum}", "optim.lr=0.00001",
            f"sam.enabled={mode != 'plain'}", f"sam.adaptive={mode == 'asam'}",
            f"sam.variant={mode if mode in ('looksam', 'esam') else 'sam'}", f"sam.looksam_every_steps={args.looksam_every}",
            f"sam.esam_weight_fraction={args.esam_weights}", f"sam.esam_data_fraction={args.esam_data}"]


def _measure(args: argparse.Namespace, stage: int, mode: str) -> dict:
    """Runs inside the child process: build the engine, time ``args.steps`` steps after warm-up."""
    import resource

    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from posttrain.config import load_config
    from posttrain.data.batch import Batch
    from posttrain.models.detector import build_detector
    from posttrain.dist import choose_device, start_process_group
    from posttrain.train.trainer import build_optimizer
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.optim.partitions import owned_parameters
    from posttrain.train.sam import LOOKSAM_DIRECTION
    from posttrain.train.step import StepContext, get_step_mode, step_mode_name

    torch.set_num_threads(args.threads)
    cfg = load_config(None, _overrides(args, stage, mode))
    device = choose_device(cfg.train.device)
    start_process_group(device, deepspeed=True)
    import deepspeed

    torch.manual_seed(0)
    model = build_detector(cfg.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = LambdaLR(optimizer, lambda _: 1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=device, world_size=1)
    step_fn = get_step_mode(step_mode_name(cfg))
    samples = int(args.seconds * SAMPLE_RATE_HZ)
    generator = torch.Generator().manual_seed(1)

    def micro_batches(step: int) -> list[Batch]:
        return [Batch(torch.randn(args.batch_size, samples, generator=generator),
                      torch.full((args.batch_size,), samples), torch.randint(0, 2, (args.batch_size,), generator=generator),
                      [f"b{step}-{m}-{i}" for i in range(args.batch_size)])
                for m in range(args.grad_accum)]

    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    times = []
    for step in range(args.warmup + args.steps):
        batches = micro_batches(step)
        if cuda:
            torch.cuda.synchronize()
        started = clock()
        ctx.step = step
        step_fn(engine, batches, ctx)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(clock() - started)
    owned = owned_parameters(engine)
    element = owned.model[0].element_size() if owned.model else 0
    held = owned.numel * element if (mode != "plain" and owned.master_aliases_model) else 0
    held += sum(t.numel() * t.element_size() for t in ctx.scratch.get("sam", {}).get(LOOKSAM_DIRECTION, []))
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"stage": stage, "mode": mode, "step_s": statistics.fmean(times), "peak_bytes": peak,
            "sam_held_bytes": held, "owned_params": owned.numel}


def _child(args: argparse.Namespace, stage: int, mode: str) -> dict:
    command = [sys.executable, "-m", "posttrain.bench", "sam", "--_child", f"{stage}:{mode}", *args.passthrough]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench sam: stage {stage} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench sam", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="audio seconds per sample")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--looksam-every", type=int, default=5)
    parser.add_argument("--esam-weights", type=float, default=0.5, help="ESAM: fraction of weights perturbed")
    parser.add_argument("--esam-data", type=float, default=0.5, help="ESAM: fraction of samples in the second pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args._child:
        stage, mode = args._child.split(":")
        print(json.dumps(_measure(args, int(stage), mode)))
        return 0
    args.passthrough = [a for a in argv]
    print(f"preset {args.preset}, {args.precision} on {args.device}, batch {args.batch_size} x {args.seconds:g} s, "
          f"grad accum {args.grad_accum}, {args.steps} timed steps, LookSAM every {args.looksam_every}, "
          f"ESAM weights {args.esam_weights:g} data {args.esam_data:g}")
    print(f"{'stage':>5}  {'mode':<8} {'step s':>8}  {'x plain':>7}  {'peak MiB':>9}  {'+MiB':>7}  {'SAM held MiB':>12}")
    for stage in args.stages:
        plain = None
        for mode in MODES:
            row = _child(args, stage, mode)
            plain = plain or row
            print(f"{stage:>5}  {mode:<8} {row['step_s']:>8.4f}  {row['step_s'] / plain['step_s']:>7.3f}  "
                  f"{row['peak_bytes'] / 2**20:>9.1f}  {(row['peak_bytes'] - plain['peak_bytes']) / 2**20:>7.1f}  "
                  f"{row['sam_held_bytes'] / 2**20:>12.3f}", flush=True)
    return 0
