"""``posttrain shards merge DIR``: the per-task indexes of a split build -> index.json + rejects.jsonl."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard directory written by `posttrain shards build --task-index ...`")


def run(args: argparse.Namespace) -> int:
    from posttrain.data.shard_build import ShardBuildError, merge
    from posttrain.data.shards import format_index

    try:
        index = merge(args.directory)
    except ShardBuildError as error:
        print(f"posttrain shards merge: {error}", file=sys.stderr)
        return 1
    print(format_index(index))
    return 0
