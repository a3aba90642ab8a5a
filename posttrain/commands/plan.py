"""``posttrain plan``: memory per GPU, the largest batch that fits, step and run time, before a run.

    posttrain plan --preset xlsr_1b --zero-stage 2 --gpu a100-80gb --gpus 8 --batch-seconds 100 --steps 800000
    posttrain plan --config configs/posttrain/xlsr_2b.yaml --gpu h200 --nodes 8 --gpus-per-node 8 --sam

With ``--config`` the preset, ZeRO stage, precision, batch seconds, SAM, activation checkpointing,
accumulation, bucket sizes and steps come from that training config; flags override them. ``--gpu``
takes the peak bf16 FLOP/s and the memory of a common accelerator (``posttrain.train.plan.GPUS``);
``--peak-tflops`` and ``--gpu-memory-gib`` override either.
"""

from __future__ import annotations

import argparse
import dataclasses

# --grpo / the config's grpo variant -> frozen models GRPO keeps beside the policy
FROZEN_MODELS = {"off": 0, "grpo2": 1, "grpo3": 2}


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.train.plan import DEFAULT_GPU, GPUS, PlanRequest

    defaults = PlanRequest()
    parser.add_argument("--config", default=None, help="a post-training YAML to take the run's settings from")
    parser.add_argument("--preset", default=None, help=f"backbone preset (default {defaults.preset})")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=None,
                        help=f"DeepSpeed ZeRO stage (default: the config's, else {defaults.zero_stage})")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                        help=f"training precision (default: the config's, else {defaults.precision})")
    parser.add_argument("--gpu", choices=sorted(GPUS), default=DEFAULT_GPU,
                        help="the accelerator: its dense bf16 peak and memory")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (with --gpus-per-node: --gpus is their product)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs on each node (default 8 with --nodes)")
    parser.add_argument("--gpus", type=int, default=None,
                        help=f"data-parallel GPUs in all (default: --nodes x --gpus-per-node, else {defaults.gpus})")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="memory of one GPU (default: --gpu's)")
    parser.add_argument("--batch-seconds", type=float, default=None,
                        help="padded audio seconds per micro-batch per GPU (data.train.max_batch_seconds)")
    parser.add_argument("--clip-seconds", type=float, default=defaults.clip_seconds, help="typical clip length")
    parser.add_argument("--sam", action=argparse.BooleanOptionalAction, default=None,
                        help=f"count SAM's second pass (default: the config's, else {defaults.sam})")
    parser.add_argument("--sam-variant", choices=["sam", "looksam", "esam"], default=None,
                        help=f"SAM every step, LookSAM or ESAM (default: the config's, else "
                             f"{defaults.sam_variant})")
    parser.add_argument("--grpo", choices=list(FROZEN_MODELS), default=None,
                        help="count GRPO's frozen models: grpo2 (GRPO_s) the reference, grpo3 (GRPO) reference and "
                             "old policy (default: the config's grpo section, else off)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help=f"activation checkpointing (default: the config's, else "
                             f"{defaults.gradient_checkpointing})")
    parser.add_argument("--grad-accum-steps", type=int, default=None,
                        help=f"micro-batches per optimiser step (default: the config's, else "
                             f"{defaults.grad_accum_steps})")
    parser.add_argument("--hfu", type=float, default=defaults.hfu,
                        help="share of the peak the executed FLOPs reach (recomputed forwards included); the MFU "
                             "printed keeps the model-FLOPs convention")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak TFLOP/s (default: --gpu's dense bf16)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of the run")
    parser.add_argument("--audio-hours", type=float, default=0.0, help="with --epochs instead of --steps")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs over --audio-hours")
    parser.add_argument("--reserve-gib", type=float, default=defaults.reserve_gib,
                        help="CUDA context, NCCL and allocator fragmentation")
    parser.add_argument("--checkpoint-write-gbps", type=float, default=defaults.checkpoint_write_gbps,
                        help="GB/s one node writes to the shared file system (default %(default)s, an assumption)")
    parser.add_argument("--checkpoint-seconds", type=float, default=defaults.checkpoint_seconds,
                        help="a measured checkpoint write time (a run's checkpoint/write_seconds metric) instead of "
                             "the estimate: the signal lead time follows it")


def gpu_count(args: argparse.Namespace) -> int:
    """``--gpus``, or ``--nodes`` x ``--gpus-per-node``; both given and different is a usage error."""
    from posttrain.errors import UserError
    from posttrain.train.plan import PlanRequest

    if args.nodes is None and args.gpus_per_node is None:
        return args.gpus if args.gpus is not None else PlanRequest.gpus
    nodes, per_node = args.nodes or 1, args.gpus_per_node or 8
    if nodes < 1 or per_node < 1:
        raise UserError("--nodes and --gpus-per-node: must be >= 1")
    if args.gpus is not None and args.gpus != nodes * per_node:
        raise UserError(f"--gpus {args.gpus} is not --nodes {nodes} x --gpus-per-node {per_node} = {nodes * per_node}; "
                        f"give one or the other, or make them agree")
    return nodes * per_node


def request_from(args: argparse.Namespace):
    """The ``PlanRequest``: defaults <- ``--gpu`` <- ``--config`` <- flags."""
    from posttrain.config import load_config
    from posttrain.errors import UserError
    from posttrain.train.plan import GPUS, PlanRequest

    gpu = GPUS[args.gpu]
    fields: dict = {"gpus": gpu_count(args), "gpu": args.gpu,
                    "gpu_memory_gib": gpu.memory_gib if args.gpu_memory_gib is None else args.gpu_memory_gib,
                    "peak_tflops": gpu.peak_bf16_tflops if args.peak_tflops is None else args.peak_tflops,
                    "clip_seconds": args.clip_seconds, "hfu": args.hfu, "audio_hours": args.audio_hours,
                    "epochs": args.epochs, "reserve_gib": args.reserve_gib, "nodes": args.nodes or 1,
                    "checkpoint_write_gbps": args.checkpoint_write_gbps, "checkpoint_seconds": args.checkpoint_seconds}
    if args.preset is not None:
        from posttrain.models.presets import PRESETS

        if args.preset not in PRESETS:
            raise UserError(f"--preset: unknown preset {args.preset!r} (known: {', '.join(sorted(PRESETS))})")
    if args.config:
        from posttrain.config import FinetuneConfig, PosttrainConfig, load_yaml

        is_finetune = "finetune" in (load_yaml(args.config) or {})
        cfg = load_config(args.config, cls=FinetuneConfig if is_finetune else PosttrainConfig)
        grpo = getattr(cfg, "grpo", None)
        fields["frozen_models"] = FROZEN_MODELS[grpo.variant if grpo is not None and grpo.enabled else "off"]
        fields.update(preset=cfg.model.preset, zero_stage=cfg.train.zero_stage, precision=cfg.train.precision,
                      batch_seconds=cfg.data.train.max_batch_seconds, sam=cfg.sam.enabled,
                      sam_variant=cfg.sam.variant, looksam_every_steps=cfg.sam.looksam_every_steps,
                      esam_data_fraction=cfg.sam.esam_data_fraction,
                      gradient_checkpointing=cfg.model.gradient_checkpointing,
                      grad_accum_steps=cfg.train.grad_accum_steps,
                      reduce_bucket_elements=cfg.train.reduce_bucket_elements,
                      allgather_bucket_elements=cfg.train.allgather_bucket_elements,
                      overlap_comm=cfg.train.overlap_comm is not False,
                      steps=0 if args.audio_hours else cfg.train.max_steps)
    flags = {"preset": args.preset, "zero_stage": args.zero_stage, "precision": args.precision,
             "batch_seconds": args.batch_seconds, "sam": args.sam, "sam_variant": args.sam_variant,
             "gradient_checkpointing": args.gradient_checkpointing, "grad_accum_steps": args.grad_accum_steps,
             "steps": args.steps}
    fields.update({key: value for key, value in flags.items() if value is not None})
    if args.grpo is not None:
        fields["frozen_models"] = FROZEN_MODELS[args.grpo]
    known = {f.name for f in dataclasses.fields(PlanRequest)}
    return PlanRequest(**{key: value for key, value in fields.items() if key in known})


def run(args: argparse.Namespace) -> int:
    from posttrain.train.plan import format_plan, plan

    result = plan(request_from(args))  # a bad config or value: one line and exit 2 (posttrain.errors)
    print(format_plan(result))
    return 0 if result.fits else 1
