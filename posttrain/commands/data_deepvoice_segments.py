"""``posttrain data deepvoice-segments --log DeepVoice_seg_log.txt --root DIR``: AD's DEEP-VOICE test segments."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", required=True,
                        help="AntiDeepfake's protocols/DeepVoice_seg_log.txt (the segments' sample bounds)")
    parser.add_argument("--root", required=True, help="the DEEP-VOICE folder holding AUDIO/{REAL,FAKE}/*.wav; "
                                                      "segments go to AUDIO_SEGMENTS/ beside it")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posttrain.data.recipes.deep_voice import SEGMENTS, cut_segments

    missing = cut_segments(Path(args.log), Path(args.root))
    for path in missing:
        print(f"missing recording (its segments skipped, as AD does): {path}", file=sys.stderr)
    print(f"{Path(args.root) / SEGMENTS}: segments written; {len(missing)} recording(s) missing")
    return 0
