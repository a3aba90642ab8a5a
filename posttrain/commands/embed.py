"""``posttrain embed --model M --shards DIR --out DIR``: pooled embeddings of every sample of a shard
set, as a memory-mapped ``embeddings.npy`` with ``meta.jsonl`` and an ``embeddings.json`` manifest
(layout: ``posttrain.select.embed``). Runs on several ranks under torchrun."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands.inference_options import add_arguments
    from posttrain.select.embeddings import DTYPES

    parser.add_argument("--model", required=True,
                        help="transformers export folder, posttrain checkpoint, AntiDeepfake release or hub id; "
                             "an ONNX export folder with --backend onnxruntime")
    parser.add_argument("--shards", type=Path, required=True, help="shard folder (index.json)")
    parser.add_argument("--out", type=Path, required=True, help="embeddings folder")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored precision of the embeddings")
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from posttrain.commands.inference_options import config_from_args, device_from_args
    from posttrain.data.shards import load_index
    from posttrain.hubcache import locate_model

    config_from_args(args)  # options, the shard set and the model's location before torch loads
    load_index(args.shards)
    locate_model(args.model)
    from posttrain.dist import process_group
    from posttrain.eval.inference import ShardSource
    from posttrain.loading import load_scorer
    from posttrain.select.embed import embed_source

    with process_group() as info:
        try:
            cfg = config_from_args(args)
            device = device_from_args(args, info)
            model, identity = load_scorer(args.model, device, backend=cfg.backend)
            manifest = embed_source(model, ShardSource(args.shards), args.out, cfg, model_identity=identity,
                                    device=device, dtype=args.dtype, info=info)
        except (ValueError, FileNotFoundError) as error:  # shard, model or option errors
            print(f"posttrain embed: error: {error}", file=sys.stderr)
            return 2
    if manifest is None:
        return 0
    for item in manifest["skipped"]["items"]:
        print(f"skipped {item['id']}: {item['reason']}: {item['detail']}")
    print(f"embedded {manifest['count']} of {manifest['index_samples']} samples (dim {manifest['dim']}, "
          f"{manifest['dtype']}) -> {args.out}")
    return 0 if manifest["count"] else 1
