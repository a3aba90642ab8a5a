"""``posttrain select nc``: neural-collapse selection of a smaller training set from embeddings.

Writes ``selection.csv`` (the selected rows of the original protocol CSVs, every column kept, so the
subset re-shards like any corpus), ``selection.json`` (options, NC1 before/after per embeddings set,
kept samples and hours per corpus, label and attack) and, with ``--shards``, ``shards/`` built from
``selection.csv``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any


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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def _read_sources(directories: list[Path], protocol_ids: set[str]) -> list[tuple[Path, Any, list[dict], dict]]:
    from posttrain.select.embed import MANIFEST_NAME, load_embeddings

    sources = []
    for directory in directories:
        embeddings, meta = load_embeddings(directory)
        missing = [item["id"] for item in meta if item["id"] not in protocol_ids]
        if missing:
            raise ValueError(f"{directory}: {len(missing)} embedded id(s) are in no --protocol CSV, "
                             f"e.g. {missing[:3]}")
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        sources.append((directory, embeddings, meta, manifest))
    return sources


def format_totals(totals: dict[str, dict[str, dict[str, float]]]) -> str:
    """The kept-audio table: one block per grouping, a line per value."""
    lines = []
    for group, values in totals.items():
        lines.append(f"{group:<24} {'samples':>8} {'kept':>8} {'hours':>9} {'kept h':>9} {'kept %':>7}")
        for value, entry in values.items():
            share = 100 * entry["kept_hours"] / entry["hours"] if entry["hours"] else 0.0
            lines.append(f"{value:<24} {entry['samples']:>8} {entry['kept_samples']:>8} {entry['hours']:>9.4f} "
                         f"{entry['kept_hours']:>9.4f} {share:>6.1f}%")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from posttrain.data.files import write_bytes_atomic
    from posttrain.data.protocol import ProtocolError, read_protocols, write_protocol
    from posttrain.select.embed import EmbeddingsError
    from posttrain.select.nc import SelectionOptions, merge_selections, select_source, totals_by

    try:
        options = SelectionOptions(budget=args.budget, budget_unit=args.budget_unit, distance=args.distance,
                                   fake_clusters=args.fake_clusters, per=args.per, seed=args.seed,
                                   chunk_rows=args.chunk_rows, kmeans_epochs=args.kmeans_epochs)
        rows = read_protocols(args.protocol)
        sources = _read_sources(args.embeddings, {row.id for row in rows})
        selections = [select_source(embeddings, meta, options, name=str(directory), model=manifest.get("model"))
                      for directory, embeddings, meta, manifest in sources]
    except (ProtocolError, EmbeddingsError, ValueError) as error:
        print(f"posttrain select nc: error: {error}", file=sys.stderr)
        return 2
    metas = [meta for _, _, meta, _ in sources]
    selected_by = merge_selections(selections, metas)
    kept_rows = [row for row in rows if row.id in selected_by]
    write_protocol(kept_rows, args.out / "selection.csv")

    records: dict[str, dict[str, Any]] = {}
    for meta in metas:
        for item in meta:
            records.setdefault(item["id"], item)
    totals = totals_by(records, set(selected_by))
    report = {
        "options": asdict(options),
        "embeddings": [str(directory) for directory in args.embeddings],
        "protocols": [str(path) for path in args.protocol],
        "sources": [{"directory": selection.name, "model": selection.model, "samples": len(meta),
                     "kept_samples": len(selection.kept_rows), "nc1_before": _finite(selection.nc1_before),
                     "nc1_after": _finite(selection.nc1_after), "groups": [asdict(group) for group in selection.groups]}
                    for selection, meta in zip(selections, metas)],
        "merged": {"samples": len(records), "kept_samples": len(selected_by),
                   "hours": totals["all"]["all"]["hours"] if records else 0.0,
                   "kept_hours": totals["all"]["all"]["kept_hours"] if records else 0.0,
                   "selected_by_sources": {str(sources_count): samples for sources_count, samples
                                           in sorted(Counter(selected_by.values()).items())}},
        "totals": totals,
    }
    write_bytes_atomic(args.out / "selection.json", (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    for selection in selections:
        print(f"{selection.name}: NC1 {selection.nc1_before:.4g} -> {selection.nc1_after:.4g} (selected), "
              f"kept {len(selection.kept_rows)} samples")
    print(format_totals(totals), end="")
    print(f"selection: {args.out / 'selection.csv'} ({len(kept_rows)} rows)")
    if args.shards:
        from posttrain.commands.shards_build import split_options
        from posttrain.data.shard_build import ShardBuildError, build_shards
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
