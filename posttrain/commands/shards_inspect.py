"""``posttrain shards inspect DIR``: the shard index as a table (per shard, then totals per group)."""

from __future__ import annotations

import argparse
import sys

from posttrain.data.shards import ShardFormatError, format_index, load_index


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard directory holding index.json")


def run(args: argparse.Namespace) -> int:
    try:
        print(format_index(load_index(args.directory)))
    except ShardFormatError as error:
        print(f"posttrain shards inspect: {error}", file=sys.stderr)
        return 1
    return 0
