"""``posttrain data prepare <corpus> --root DIR --out protocol.csv``: a corpus layout -> protocol CSV."""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.data.recipes import RECIPES

    parser.add_argument("corpus", choices=sorted(RECIPES), help="recipe name (the corpus layout)")
    parser.add_argument("--root", required=True, help="the corpus folder; CSV paths are written as $ROOT/...")
    parser.add_argument("--out", required=True, help="protocol CSV to write")
    parser.add_argument("--num-workers", type=int, default=8, help="threads reading audio headers")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out (and count) listed files that are missing or unusable, instead of failing; each "
                             "is a line of OUT.rejects.jsonl with its reason (missing, unreadable, rate_out_of_range, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from posttrain.data.files import write_text_atomic
    from posttrain.data.recipes import RECIPES, prepare

    result = prepare(args.corpus, args.root, args.out, num_workers=args.num_workers,
                     skip_missing=args.skip_missing, progress=not args.no_progress)
    counts = collections.Counter((row.proportion, row.label) for row in result.rows)
    hours = sum(row.duration_s for row in result.rows) / 3600
    print(f"{args.out}: {len(result.rows)} rows, {hours:.2f} h; "
          + ", ".join(f"{split}/{label} {n}" for (split, label), n in sorted(counts.items())))
    for problem in result.skipped[:10]:
        print(f"skipped {problem}", file=sys.stderr)
    if result.rejects:
        rejects = Path(args.out).with_suffix(".rejects.jsonl")
        write_text_atomic(rejects, "".join(json.dumps(reject, sort_keys=True) + "\n" for reject in result.rejects))
        reasons = collections.Counter(reject["reason"] for reject in result.rejects)
        print(f"skipped {len(result.rejects)} file(s) ({', '.join(f'{r} {n}' for r, n in reasons.most_common())}); "
              f"one JSON line each in {rejects}", file=sys.stderr)
    note = RECIPES[args.corpus].parity_note
    if note:
        print(f"note: {note}")
    return 0
