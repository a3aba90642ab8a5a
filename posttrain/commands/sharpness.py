"""``posttrain sharpness --model M --shards DIR [--rho 0.05] [--adaptive] [--by attack] --out DIR``:
m-sharpness of a model on a shard set, overall and per group (JSON + table).

Under torchrun every rank measures a share of the batches; rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from posttrain.data.labels import GROUP_FIELDS


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data and measure options shared with ``posttrain sharpness correlate``."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", "--checkpoint", dest="model",
                       help="transformers export, posttrain checkpoint (folder or tag), AntiDeepfake release or hub id")
    model.add_argument("--random-preset", metavar="PRESET",
                       help="a randomly initialised detector of this preset (seeded by --seed): for dry runs and tests")
    parser.add_argument("--shards", type=Path, required=True, help="shard folder (index.json) of the test set")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--rho", type=float, default=0.05, help="perturbation radius")
    parser.add_argument("--adaptive", action="store_true", help="ASAM's scale-invariant perturbation")
    parser.add_argument("--eta", type=float, default=0.01, help="ASAM's T = |w| + eta on weights")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch B")
    parser.add_argument("--max-seconds", type=float, default=6.0, help="audio kept from the start of each sample")
    parser.add_argument("--seed", type=int, default=0, help="batch order seed")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--by", choices=GROUP_FIELDS, default=None, help="also measure per group")


def check_inputs(args: argparse.Namespace) -> None:
    """The options, the shard set and the model's location, checked without torch."""
    from posttrain.data.shards import load_index
    from posttrain.hubcache import locate_model

    if args.rho <= 0 or args.batch_size < 1 or args.max_seconds <= 0:
        raise ValueError("--rho and --max-seconds must be > 0 and --batch-size >= 1")
    load_index(args.shards)
    if args.model is not None:
        locate_model(args.model)


def measure_config(args: argparse.Namespace):
    from posttrain.eval.sharpness import SharpnessConfig

    return SharpnessConfig(rho=args.rho, adaptive=args.adaptive, adaptive_eta=args.eta, batch_size=args.batch_size,
                           max_seconds=args.max_seconds, seed=args.seed)


def load_for_args(args: argparse.Namespace, device) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode on ``device``, identity) from ``--model`` or ``--random-preset``."""
    import torch

    if args.random_preset:
        from posttrain.config import ModelConfig
        from posttrain.models.detector import build_detector

        torch.manual_seed(args.seed)
        model = build_detector(ModelConfig(preset=args.random_preset)).to(device).eval()
        return model, {"random_preset": args.random_preset, "seed": args.seed}
    from posttrain.loading import load_model

    return load_model(args.model, device)


def model_description(identity: dict[str, Any]) -> dict[str, Any]:
    return identity.get("loaded_from") or identity


def run(args: argparse.Namespace) -> int:
    check_inputs(args)  # a bad input is one line and exit 2 before torch loads
    import torch

    from posttrain.dist import choose_device
    from posttrain.dist import process_group
    from posttrain.eval.sharpness import catalog, format_sharpness_table, grouped_sets, measure_sets
    from posttrain.data.files import write_text_atomic

    with process_group() as info:
        try:
            cfg = measure_config(args)
            device = choose_device("auto", info.local_rank) if args.device is None else torch.device(args.device)
            model, identity = load_for_args(args, device)
            sets = grouped_sets(catalog(args.shards), args.by)
        except (ValueError, FileNotFoundError) as error:
            print(f"posttrain sharpness: error: {error}", file=sys.stderr)
            return 2
        results = measure_sets(model, sets, cfg, device=device, info=info, progress=not args.no_progress and info.is_main)
        if not info.is_main:
            return 0
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"model": model_description(identity), "shards": str(args.shards), "by": args.by,
                "config": vars(cfg), "world_size": info.world_size,
                "sets": {name: result.to_dict() for name, result in results.items()}}
    table = format_sharpness_table(results)
    write_text_atomic(args.out / "sharpness.json", json.dumps(document, indent=1))
    write_text_atomic(args.out / "sharpness.txt", table + "\n")
    print(table)
    return 0
