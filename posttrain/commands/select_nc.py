"""``posttrain select nc``: neural-collapse selection of a smaller training set from embeddings.

Writes ``selection.csv`` and ``selection.json`` (``posttrain.select.report``) and, with ``--shards``,
``shards/`` built from ``selection.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.select.nc import BUDGET_UNITS, DISTANCES, GROUPINGS, SelectionOptions

    defaults = SelectionOptions()
    parser.add_argument("--embeddings", nargs="+", required=True, type=Path,
                        help="embeddings folder(s) from `posttrain embed`, one per source model")
    parser.add_argument("--protocol", nargs="+", required=True, type=Path,
                        help="protocol CSV(s) holding every embedded sample's row")
    parser.add_argument("--root", default=None, help="data root replacing $ROOT in the CSV paths (for --shards)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--budget", type=float, default=defaults.budget,
                        help="fraction kept of every (source, label) group, e.g. 0.2 = 20 %%")
    parser.add_argument("--budget-unit", choices=BUDGET_UNITS, default=defaults.budget_unit,
                        help="the budget counts samples or audio seconds")
    parser.add_argument("--distance", choices=DISTANCES, default=defaults.distance,
                        help="distance of an embedding to its class mean")
    parser.add_argument("--fake-clusters", type=int, default=defaults.fake_clusters,
                        help="k of the k-means clustering of the fake class")
    parser.add_argument("--per", choices=GROUPINGS, default=defaults.per,
                        help="'corpus': budget and class means per corpus within each source")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="k-means and shard shuffle seed")
    from posttrain.commands.shards_build import add_split_arguments

    add_split_arguments(parser, "for --shards")
    parser.add_argument("--chunk-rows", type=int, default=defaults.chunk_rows,
                        help="embedding rows read at once (bounds memory)")
    parser.add_argument("--kmeans-epochs", type=int, default=defaults.kmeans_epochs,
                        help="partial_fit passes over each fake group")
    parser.add_argument("--shards", action="store_true", help="also build shards of the selection in OUT/shards")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard at most")


def run(args: argparse.Namespace) -> int:
    from posttrain.data.protocol import ProtocolError
    from posttrain.select.embeddings import EmbeddingsError
    from posttrain.select.nc import SelectionOptions
    from posttrain.select.report import format_totals, select_to_files

    try:
        options = SelectionOptions(budget=args.budget, budget_unit=args.budget_unit, distance=args.distance,
                                   fake_clusters=args.fake_clusters, per=args.per, seed=args.seed,
                                   chunk_rows=args.chunk_rows, kmeans_epochs=args.kmeans_epochs)
        result = select_to_files(args.embeddings, args.protocol, options, args.out)
    except (ProtocolError, EmbeddingsError, ValueError) as error:
        print(f"posttrain select nc: error: {error}", file=sys.stderr)
        return 2
    for selection in result.selections:
        print(f"{selection.name}: NC1 {selection.nc1_before:.4g} -> {selection.nc1_after:.4g} (selected), "
              f"kept {len(selection.kept_rows)} samples")
    print(format_totals(result.totals), end="")
    print(f"selection: {args.out / 'selection.csv'} ({result.kept_rows} rows)")
    if args.shards:
        from posttrain.commands.shards_build import split_options
        from posttrain.data.shard_build import build_shards
        from posttrain.data.shard_plan import ShardBuildError
        from posttrain.data.shards import format_index

        try:
            index = build_shards([args.out / "selection.csv"], args.root, args.out / "shards",
                                 max_samples_per_shard=args.max_samples_per_shard, seed=args.seed,
                                 **split_options(args))
        except (ShardBuildError, ValueError) as error:
            print(f"posttrain select nc: error: shards: {error}", file=sys.stderr)
            return 1
        print(format_index(index, args.out / "shards"))
    return 0
