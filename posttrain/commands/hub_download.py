"""``posttrain hub download REPO_ID --out DIR``: fetch a released AntiDeepfake checkpoint (e.g.
``nii-yamagishilab/xls-r-1b-anti-deepfake``; any repo id or local folder works) into the Hugging Face
cache, then convert it to a transformers export. ``HF_HUB_OFFLINE=1`` reads the cache only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.commands.hub_convert import ERRORS, EXPORT_KIND, add_output_options, convert_to_export, report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="hub repo id (owner/name) or a local folder/file")
    parser.add_argument("--revision", default=None, help="branch, tag or commit on the hub")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from posttrain.hub.folders import check_out_dir
    from posttrain.hubcache import hub_snapshot

    try:
        check_out_dir(args.out, EXPORT_KIND, overwrite=args.overwrite)  # before the download, not after it
        local = Path(args.source).expanduser()
        repo_id = None
        if not local.exists():
            repo_id, local = args.source, hub_snapshot(args.source, revision=args.revision)
            print(f"{repo_id}: snapshot {local}")
        out = convert_to_export(local, args.out, preset=args.preset, repo_id=repo_id, overwrite=args.overwrite)
    except ERRORS as error:
        print(f"posttrain hub download: error: {error}", file=sys.stderr)
        return 2
    report(out)
    return 0
