"""``posttrain data partialspoof --protocol CSV --root DIR --out DIR``: a partial-spoof test set.

Real recordings with a fake one spliced in, the reverse, and all-real files (``posttrain.data.partialspoof``),
with the true segment boundaries in ``partialspoof.segments.csv`` next to the protocol; evaluate it
with ``posttrain eval --protocol OUT/partialspoof.csv --root OUT --segments OUT/partialspoof.segments.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", type=Path, required=True,
                        help="protocol CSV whose recordings are spliced (e.g. the demo corpus' test.csv)")
    parser.add_argument("--root", type=Path, default=None, help="data root replacing $ROOT in the protocol")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (audio/, partialspoof.csv, partialspoof.segments.csv; $ROOT = it)")
    parser.add_argument("--files", type=int, default=60, help="files to build, kinds in turn: realhost, "
                                                                "fakehost, real (default: 60)")
    parser.add_argument("--clips-per-file", type=int, default=4, help="recordings per file (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="the one seed of every draw (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from posttrain.data.partialspoof import build_partialspoof

    # a bad protocol or option is a ValueError: the CLI shows its one line with exit code 2
    result = build_partialspoof(args.protocol, args.root, args.out, files=args.files,
                                clips_per_file=args.clips_per_file, seed=args.seed, progress=not args.no_progress)
    fake = sum(row.label == "fake" for row in result.rows)
    print(f"{len(result.rows)} files ({fake} partly fake, {len(result.rows) - fake} real), "
          f"{sum(row.duration_s for row in result.rows) / 60:.1f} min -> {result.protocol_path}")
    print(f"segments: {result.segments_path}")
    print(f"evaluate: posttrain eval --model MODEL --protocol {result.protocol_path} --root {args.out} "
          f"--segments {result.segments_path} --window-seconds 0.5 --hop-seconds 0.1 --min-tail-seconds 0.2 "
          f"--out REPORT_DIR")
    return 0
