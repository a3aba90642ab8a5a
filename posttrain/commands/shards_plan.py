"""``posttrain shards plan MIX.yaml --root DIR``: hours on disk vs expected, shard count, build time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.data.mix import SPLITS
    from posttrain.data.mix_plan import DEFAULT_THROUGHPUT, DEFAULT_TOLERANCE_PCT

    parser.add_argument("mix", help="mix definition (shards/*.yaml)")
    parser.add_argument("--root", required=True, help="data root the mix's protocol and audio paths are relative to")
    parser.add_argument("--split", choices=SPLITS, default="train", help="which split of the mix to plan")
    parser.add_argument("--cores", type=int, default=1, help="cores the build will run on (all tasks together)")
    parser.add_argument("--throughput", type=float, default=DEFAULT_THROUGHPUT,
                        help="audio-seconds per core-second of the shard build "
                             "(measure with `python -m posttrain.bench shards`)")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-shard-mb", type=float, default=1000.0, help="size bound per shard (10^6 bytes)")
    parser.add_argument("--name", default="train", help="shard file prefix, as `shards build --name`")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed, as `shards build --seed`")
    parser.add_argument("--tolerance-pct", type=float, default=DEFAULT_TOLERANCE_PCT,
                        help="flag corpora whose hours deviate from the expected hours by more than this")
    parser.add_argument("--json", default=None, help="also write the full plan (every language) as JSON here")


def run(args: argparse.Namespace) -> int:
    from posttrain.data.files import write_bytes_atomic
    from posttrain.data.mix import load_mix
    from posttrain.data.mix_plan import format_plan, plan_mix
    from posttrain.data.shard_plan import BuildOptions

    mix = load_mix(args.mix)
    options = BuildOptions(name=args.name, max_samples_per_shard=args.max_samples_per_shard,
                           max_shard_mb=args.max_shard_mb, seed=args.seed)
    plan = plan_mix(mix, Path(args.root), split=args.split, options=options, throughput=args.throughput,
                    cores=args.cores, tolerance_pct=args.tolerance_pct)
    print(format_plan(plan))
    if args.json:
        write_bytes_atomic(args.json, (json.dumps(plan.to_dict(), indent=1) + "\n").encode("utf-8"))
    return 0
