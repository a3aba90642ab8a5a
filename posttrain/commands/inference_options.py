"""The inference options shared by ``posttrain eval``, ``score`` and ``embed``: argparse flags -> an
``InferenceConfig`` and a device (the library, ``posttrain.eval.inference``, knows no command line)."""

from __future__ import annotations

import argparse

from posttrain.data.audio import DEFAULT_MAX_FILE_SECONDS
from posttrain.eval.scoring import AGGREGATIONS, BACKENDS, PRECISIONS, SCORING_MODES, InferenceConfig, WindowConfig


def add_arguments(parser: argparse.ArgumentParser, *, batch_seconds: float = 200.0) -> None:
    """The inference options shared by ``eval``, ``score`` and ``embed``."""
    defaults = WindowConfig()
    group = parser.add_argument_group("inference")
    group.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="onnxruntime: run an ONNX export (`posttrain export --format onnx`; --model is its "
                            "folder) on the CPU, fp32; onnxruntime-int8: its model.int8.onnx (--quantize int8)")
    group.add_argument("--mode", choices=SCORING_MODES, default="windowed",
                       help="antideepfake: AntiDeepfake's test protocol (every file whole, batch 1; "
                            "no window options); windowed: long files in windows, files batched")
    group.add_argument("--window-seconds", type=float, default=defaults.window_seconds,
                       help="window length for long files (0: score every file whole)")
    group.add_argument("--hop-seconds", type=float, default=None,
                       help="hop between windows (default: the window length, i.e. no overlap)")
    group.add_argument("--min-tail-seconds", type=float, default=defaults.min_tail_seconds,
                       help="a last window shorter than this is merged into the one before it")
    group.add_argument("--aggregation", choices=AGGREGATIONS, default="mean_logits",
                       help="window outputs -> file output: length-weighted mean of logits, or the most fake window")
    group.add_argument("--batch-seconds", type=float, default=batch_seconds,
                       help="padded audio seconds per forward pass (bounds device memory)")
    group.add_argument("--max-batch-size", type=int, default=InferenceConfig.max_batch_size,
                       help="windows per forward pass at most")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast on CUDA")
    group.add_argument("--num-workers", type=int, default=0, help="decoding worker processes per rank")
    group.add_argument("--max-file-seconds", type=float, default=DEFAULT_MAX_FILE_SECONDS,
                       help="the most audio decoded from one file, seconds (bounds memory); a longer file is "
                            "skipped as too_long")
    group.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> InferenceConfig:
    shared = {"precision": args.precision, "num_workers": args.num_workers, "progress": not args.no_progress,
              "backend": args.backend}
    if args.mode == "antideepfake":
        defaults = WindowConfig()
        windowing = {"--window-seconds": (args.window_seconds, defaults.window_seconds),
                     "--hop-seconds": (args.hop_seconds, None), "--max-batch-size": (args.max_batch_size, InferenceConfig.max_batch_size)}
        given = [flag for flag, (value, default) in windowing.items() if value != default]
        if given:
            raise ValueError(f"--mode antideepfake scores every file whole and alone: drop {', '.join(given)}")
        cfg = InferenceConfig.antideepfake(**shared)
    else:
        hop = args.window_seconds if args.hop_seconds is None else args.hop_seconds
        cfg = InferenceConfig(window=WindowConfig(args.window_seconds, hop, args.min_tail_seconds),
                              aggregation=args.aggregation, batch_seconds=args.batch_seconds,
                              max_batch_size=args.max_batch_size, **shared)
    cfg.validate()
    return cfg


def device_from_args(args: argparse.Namespace, info):
    """The torch device of ``args.device``, else ``cuda:LOCAL_RANK`` when CUDA is visible, else the CPU."""
    import torch

    from posttrain.dist import choose_device

    if args.backend.startswith("onnxruntime"):  # a CPU backend: cuda only when asked (then refused)
        return torch.device(args.device or "cpu")
    return torch.device(args.device) if args.device else choose_device("auto", info.local_rank)
