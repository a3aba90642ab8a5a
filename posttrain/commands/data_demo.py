"""``posttrain data demo --out DIR``: klettres recordings vs espeak-ng speech of the same texts."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.data import demo

    parser.add_argument("--out", required=True, help="output folder (audio/ + train/valid/test.csv; CSV paths use "
                                                     "$ROOT = this folder)")
    parser.add_argument("--languages", default=",".join(demo.DEFAULT_LANGUAGES),
                        help=f"comma-separated klettres languages (available: {','.join(demo.ESPEAK_VOICES)})")
    parser.add_argument("--max-per-language", type=int, default=demo.DEFAULT_MAX_PER_LANGUAGE,
                        help="recordings per language at most (0 = all); each gives one real and one fake file")
    parser.add_argument("--seed", type=int, default=0, help="sampling, split and attack seed")
    parser.add_argument("--klettres-dir", default=str(demo.KLETTRES_DIR), help="klettres-data sounds folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from posttrain.data import demo

    languages = tuple(language.strip() for language in args.languages.split(",") if language.strip())
    result = demo.build_demo(args.out, languages=languages, max_per_language=args.max_per_language or None,
                             seed=args.seed, klettres_dir=args.klettres_dir, progress=not args.no_progress)
    print(demo.summary(result))
    return 0
