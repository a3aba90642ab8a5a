"""``posttrain export --format {transformers,onnx} MODEL --out DIR``: any model posttrain loads (checkpoint,
transformers export, AntiDeepfake release, hub id) as a shareable folder.

``transformers``: the stock ``*ForSequenceClassification`` export with its card (``posttrain.hub.export``, what
``publish`` and ``hub convert`` write). ``onnx``: ``model.onnx`` taking raw 16 kHz audio and lengths, the
model's normalisation inside the graph, with ``labels.json``, the stored calibration, ``posttrain.json`` and a
card whose snippet scores a file with onnxruntime alone (``posttrain.hub.onnx_export``); ``--quantize int8``
adds ``model.int8.onnx``, and each ``--int8-check NAME=DATA`` the int8 model's EER, fp32's and their scores'
correlation on that labelled set to ``posttrain.json`` and the card (``posttrain.hub.onnx_int8_check``). Either
folder is written beside ``--out`` and renamed into place (``posttrain.hub.folders``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.commands.hub_convert import add_out_option, transformers_export
from posttrain.eval.int8_check import FORMAT, OPTION, check_set, summary_line

FORMATS = ("transformers", "onnx")
# the export kind each format's folder is marked with (posttrain.hub.folders): a later export of the same
# format may replace it without --overwrite
EXPORT_KINDS = {"transformers": "export", "onnx": "onnx"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, transformers export, AntiDeepfake release or hub id")
    parser.add_argument("--format", choices=FORMATS, required=True, help="what to write")
    add_out_option(parser)
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="onnx only: also write model.int8.onnx (dynamic int8 weights, onnxruntime)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json stored with the export (default: the model's own, if any)")
    parser.add_argument(OPTION, type=check_set, action="append", default=[], metavar=FORMAT,
                        help="with --quantize int8: score the labelled set DATA (a shard folder, a protocol CSV, or "
                             "CSV:ROOT for $ROOT paths) with model.onnx and model.int8.onnx as `posttrain eval "
                             "--max-batch-size 1` does, and write both EERs with their bootstrap CIs and the scores' "
                             "Pearson r to posttrain.json and the card (repeatable)")


def run(args: argparse.Namespace) -> int:
    from posttrain.hub.folders import check_out_dir
    from posttrain.hubcache import locate_model

    if args.quantize and args.format != "onnx":
        print(f"posttrain export: error: --quantize {args.quantize}: only --format onnx is quantised", file=sys.stderr)
        return 2
    names = [check.name for check in args.int8_check]
    if names and args.quantize != "int8":
        print(f"posttrain export: error: {OPTION} checks model.int8.onnx: add --quantize int8 (and --format onnx), "
              f"or drop {OPTION}", file=sys.stderr)
        return 2
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        print(f"posttrain export: error: {OPTION}: the set name {', '.join(twice)} is given twice; name each set "
              f"once", file=sys.stderr)
        return 2
    try:
        check_out_dir(args.out, EXPORT_KINDS[args.format], overwrite=args.overwrite)  # before torch loads
        locate_model(args.model)
        if args.calibration is not None and not args.calibration.is_file():
            raise FileNotFoundError(f"--calibration {args.calibration}: no such file")
    except (ValueError, FileNotFoundError) as error:
        print(f"posttrain export: error: {error}", file=sys.stderr)
        return 2
    from posttrain.loading import load_model

    try:
        detector, identity = load_model(args.model)
        loaded_from = identity.pop("loaded_from")  # where it was read this time: not part of the identity
        if args.calibration is not None:
            from posttrain.hub.publish import calibration_entry

            identity["calibration"] = calibration_entry(args.calibration)
        checked_sets = []
        if args.int8_check:
            from posttrain.hub.onnx_int8_check import export_onnx_checked

            out, checked = export_onnx_checked(detector, args.out, identity, args.int8_check,
                                               overwrite=args.overwrite, exported_from=loaded_from["spec"])
            checked_sets = checked["sets"]
        elif args.format == "onnx":
            from posttrain.hub.onnx_export import export_onnx

            out = export_onnx(detector, args.out, identity, quantize=args.quantize, overwrite=args.overwrite,
                              exported_from=loaded_from["spec"])
        else:
            out = transformers_export(detector, identity, args.out, kind=EXPORT_KINDS[args.format],
                                      overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:  # incl. Export / Conversion / Calibration errors
        print(f"posttrain export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}{', int8 too' if args.quantize else ''})")
    for row in checked_sets:
        # a missed goal is the measurement to publish, not a failed export: the card states it either way
        print(f"{'int8 check' if row['passed'] else 'posttrain export: warning: int8 check'} {summary_line(row)}",
              file=sys.stdout if row["passed"] else sys.stderr)
    return 0

