"""``posttrain shards merge DIR``: the per-task indexes of a split build -> index.json + rejects.jsonl."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard directory written by `posttrain shards build --task-index ...`")


def run(args: argparse.Namespace) -> int:
    from posttrain.data.shard_build import merge
    from posttrain.data.shards import format_index

    print(format_index(merge(args.directory), args.directory))
    return 0
