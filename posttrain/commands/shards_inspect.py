"""``posttrain shards inspect DIR``: the shard index as a table (per shard, then totals per group)."""

from __future__ import annotations

import argparse

from posttrain.data.shards import format_index, load_index


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard directory holding index.json")


def run(args: argparse.Namespace) -> int:
    print(format_index(load_index(args.directory), args.directory))
    return 0
