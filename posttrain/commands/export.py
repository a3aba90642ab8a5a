"""``posttrain export --format {transformers,onnx} MODEL --out DIR``: any model posttrain loads (checkpoint,
transformers export, AntiDeepfake release, hub id) as a shareable folder.

``transformers``: the stock ``*ForSequenceClassification`` export with its card (``posttrain.hub.export``, what
``publish`` and ``hub convert`` write). ``onnx``: ``model.onnx`` taking raw 16 kHz audio and lengths, the
model's normalisation inside the graph, with ``labels.json``, the stored calibration, ``posttrain.json`` and a
card whose snippet scores a file with onnxruntime alone (``posttrain.hub.onnx_export``); ``--quantize int8``
adds ``model.int8.onnx``. Either folder is written beside ``--out`` and renamed into place
(``posttrain.hub.folders``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.commands.hub_convert import add_out_option, transformers_export

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


def run(args: argparse.Namespace) -> int:
    from posttrain.hub.folders import check_out_dir
    from posttrain.hubcache import locate_model

    if args.quantize and args.format != "onnx":
        print(f"posttrain export: error: --quantize {args.quantize}: only --format onnx is quantised", file=sys.stderr)
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
        if args.format == "onnx":
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
    return 0

