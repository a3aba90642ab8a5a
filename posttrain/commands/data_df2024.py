"""``posttrain data df2024``: Deepfake-Eval-2024 metadata -> protocol CSVs, 16 kHz FLAC, segments, shards."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.data import df2024

    parser.add_argument("--metadata", required=True, help="audio-metadata-publish.csv")
    parser.add_argument("--audio-dir", required=True, help="folder of the audio files the metadata names")
    parser.add_argument("--out", required=True, help="output folder (CSV paths use $ROOT = this folder)")
    parser.add_argument("--segment-seconds", type=int, nargs="+", default=list(df2024.SEGMENT_SECONDS),
                        help="segment lengths in seconds (default: %(default)s)")
    parser.add_argument("--min-segment-seconds", type=float, default=df2024.DEFAULT_MIN_SEGMENT_SECONDS,
                        help="drop a last segment shorter than this, unless it is the file's only one "
                             "(0 keeps every last piece, as AntiDeepfake)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="leave out metadata rows with a bad label, split or file name (listed in rejects.csv) "
                             "instead of stopping, as AntiDeepfake's preprocessing does")
    parser.add_argument("--shards", action="store_true", help="also build WebDataset shards of every segment set")
    parser.add_argument("--num-workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--seed", type=int, default=0, help="shard build seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from posttrain.data import df2024

    result = df2024.prepare_df2024(args.metadata, args.audio_dir, args.out, segment_seconds=args.segment_seconds,
                                   min_segment_seconds=args.min_segment_seconds, skip_bad_rows=args.skip_bad_rows,
                                   shards=args.shards,
                                   num_workers=args.num_workers, seed=args.seed, progress=not args.no_progress)
    print(df2024.summary(result))
    return 0
