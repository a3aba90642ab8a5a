"""The DeepSpeed config of a run, generated from the typed config: ZeRO section, precision, loss scaling,
communication buckets and ``overlap_comm``, with ``train.deepspeed_overrides`` merged last and the ZeRO
settings a step mode cannot run under refused; and the precision check done before any engine exists."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from posttrain.config import PosttrainConfig
from posttrain.dist import choose_device
from posttrain.errors import UserError
from posttrain.optim.partitions import check_zero_section
from posttrain.train.step import edits_partitions, overlap_comm_safe, step_mode_name


def merge_dicts(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: PosttrainConfig, *, load_universal: bool = False,
                     device_type: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config generated from the typed config, ``train.deepspeed_overrides`` merged last.

    Batches are dynamic (bounded by audio seconds), so ``train_micro_batch_size_per_gpu`` is a
    nominal 1: DeepSpeed uses it only for its own sample counter. Stage 3 keeps no parameter
    persistent so every parameter lives only in its owner's partition (SAM perturbs partitions).
    ``device_type`` (default: where ``train.device`` resolves) decides ``overlap_comm`` when the
    config leaves it open (``resolve_overlap_comm``)."""
    train = cfg.train
    device_type = device_type or choose_device(cfg.train.device).type
    zero: dict[str, Any] = {"stage": train.zero_stage, "overlap_comm": resolve_overlap_comm(cfg, device_type),
                            "contiguous_gradients": True, "reduce_bucket_size": train.reduce_bucket_elements}
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_prefetch_bucket_size"] = train.allgather_bucket_elements
    else:
        zero["allgather_bucket_size"] = train.allgather_bucket_elements
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        # AntiDeepfake's torch GradScaler: dynamic scale from 2^16, halved on every overflow (hysteresis 1),
        # doubled after 2000 clean steps; an overflow skips the step (counted like a non-finite step)
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 2000, "hysteresis": 1, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # the client AdamW (see step.SkippableAdamW)
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own progress lines are noise
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return checked_deepspeed_config(merge_dicts(config, train.deepspeed_overrides), cfg, "train.deepspeed_overrides")


def builds_in_partitions(cfg: PosttrainConfig) -> bool:
    """Whether the run's model is built straight into ZeRO-3 partitions (``train.partitioned_init``)."""
    return cfg.train.zero_stage == 3 and cfg.train.partitioned_init


def check_precision_supported(precision: str, device: torch.device) -> None:
    """A precision the DeepSpeed accelerator of this machine refuses is one line naming the key, not
    DeepSpeed's traceback from inside ``initialize`` (its CPU accelerator reports fp16 only where oneDNN
    has fp16 kernels: AVX512-FP16 or AMX-FP16)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        raise UserError(f"train.precision: {precision} is not supported by DeepSpeed's "
                        f"{accelerator.device_name()} accelerator on this machine; use train.precision=bf16 "
                        f"(the default) or fp32")


def checked_deepspeed_config(config: dict[str, Any], cfg: PosttrainConfig, source: str) -> dict[str, Any]:
    """``config`` after refusing ZeRO settings the step mode cannot run under (see
    ``partitions.check_zero_section``); ``source`` names where a user could have set them."""
    mode = step_mode_name(cfg)
    if edits_partitions(cfg, mode):
        check_zero_section(config.get("zero_optimization", {}), mode, source)
    return config


def resolve_overlap_comm(cfg: PosttrainConfig, device_type: str) -> bool:
    """``train.overlap_comm``, or when unset: on for CUDA (the reduction runs on a side stream during
    the backward), off on CPU (no streams: nothing overlaps, and ZeRO-1/2 would double the reduce
    bucket). Forcing it on for a step mode registered as unsafe with it raises."""
    mode = step_mode_name(cfg)
    safe = overlap_comm_safe(cfg, mode)
    if cfg.train.overlap_comm is None:
        return device_type == "cuda" and safe
    if cfg.train.overlap_comm and not safe:
        raise ValueError(f"train.overlap_comm: step mode {mode!r} reads gradients while DeepSpeed may still be "
                         "reducing them; set train.overlap_comm to false (or leave it unset)")
    return cfg.train.overlap_comm
