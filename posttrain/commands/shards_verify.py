"""``posttrain shards verify DIR``: re-hash every shard and re-decode every sample against the index."""

from __future__ import annotations

import argparse
import sys

from posttrain.data.shards import load_index, verify_shards


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard directory holding index.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    problems = verify_shards(args.directory, progress=not args.no_progress)
    index = load_index(args.directory)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        print(f"posttrain shards verify: {len(problems)} problem(s) in {args.directory}", file=sys.stderr)
        return 1
    print(f"ok: {len(index['shards'])} shards, {index['totals']['samples']} samples, "
          f"{index['totals']['seconds'] / 3600:.3f} h verified")
    return 0
