"""``posttrain sharpness correlate --model M --shards DIR [--by attack] [--steps N] --out DIR``: EER and
m-sharpness over nested subsets of a test set (growing numbers of attacks, languages, corpora or
speakers in a seeded order), their Spearman and Kendall rank correlations with p-values, a
scatter plot (correlation.png), JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import sys

from posttrain.commands.sharpness import (add_common_arguments, check_inputs, load_for_args, measure_config,
                                          model_description)
from posttrain.data.labels import GROUP_FIELDS


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--by", choices=GROUP_FIELDS, default="attack", help="what the nested subsets grow in")
    parser.add_argument("--steps", type=int, default=None,
                        help="number of nested subsets (default: one per added group)")


def format_table(rows: list[dict], correlation: dict) -> str:
    lines = [f"{'subset':<14}  {'groups':>6}  {'samples':>7}  {'EER %':>7}  {'sharpness':>11}"]
    for row in rows:
        lines.append(f"{row['name']:<14}  {len(row['groups']):>6d}  {row['samples']:>7d}  {100 * row['eer']:>7.3f}  "
                     f"{row['sharpness']:>11.6f}")
    lines.append(f"Spearman {correlation['spearman']:.4f} (p={correlation['spearman_p']:.4g}), "
                 f"Kendall {correlation['kendall']:.4f} (p={correlation['kendall_p']:.4g}), "
                 f"{correlation['points']} subsets")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 3:
        raise ValueError("--steps must be >= 3 (a rank correlation needs at least 3 subsets)")
    check_inputs(args)  # a bad input is one line and exit 2 before torch loads
    import torch

    from posttrain.dist import choose_device
    from posttrain.dist import process_group
    from posttrain.eval.sharpness import (catalog, measure_sets, nested_subsets, plot_correlation, rank_correlation,
                                          scores_of, subset_eer)
    from posttrain.data.files import write_text_atomic

    with process_group() as info:
        try:
            cfg = measure_config(args)
            device = choose_device("auto", info.local_rank) if args.device is None else torch.device(args.device)
            model, identity = load_for_args(args, device)
            entries = catalog(args.shards)
            subsets = nested_subsets(entries, args.by, steps=args.steps, seed=args.seed)
            if len(subsets) < 3:
                raise ValueError(f"{args.shards}: only {len(subsets)} nested subsets by {args.by} hold both classes; "
                                 "at least 3 are needed")
        except (ValueError, FileNotFoundError) as error:
            print(f"posttrain sharpness correlate: error: {error}", file=sys.stderr)
            return 2
        progress = not args.no_progress and info.is_main
        scores = scores_of(model, entries, cfg, device=device, info=info, progress=progress)
        measured = measure_sets(model, {s.name: s.entries for s in subsets}, cfg, device=device, info=info,
                                progress=progress)
        if not info.is_main:
            return 0
    rows = [{"name": s.name, "groups": list(s.groups), "samples": measured[s.name].samples, "eer": subset_eer(s, scores),
             **{k: v for k, v in measured[s.name].to_dict().items() if k != "samples"}} for s in subsets]
    correlation = rank_correlation([r["sharpness"] for r in rows], [r["eer"] for r in rows])
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"model": model_description(identity), "shards": str(args.shards), "by": args.by,
                "config": vars(cfg), "subsets": rows, "correlation": correlation.to_dict()}
    table = format_table(rows, correlation.to_dict())
    write_text_atomic(args.out / "correlation.json", json.dumps(document, indent=1))
    write_text_atomic(args.out / "correlation.txt", table + "\n")
    plot_correlation(args.out / "correlation.png", [r["sharpness"] for r in rows], [r["eer"] for r in rows],
                     [r["name"].split(":")[-1] for r in rows], correlation, title=f"by {args.by}: ")
    print(table)
    return 0
