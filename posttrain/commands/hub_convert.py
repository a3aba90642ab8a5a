"""``posttrain hub convert PATH --out DIR``: a local AntiDeepfake checkpoint (fairseq-layout
``model.safetensors`` or SpeechBrain ``.ckpt``, or a folder holding one) -> a transformers export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ERRORS = (ValueError, FileNotFoundError)  # ConversionError / ExportError / ModelNotAvailableError
EXPORT_KIND = "convert"  # hub convert and hub download write the same kind of export


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model.safetensors / .ckpt file, or a folder holding one")
    add_output_options(parser)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    add_out_option(parser)
    parser.add_argument("--preset", default=None,
                        help="preset among those with the checkpoint's shape (default: read from the weights)")


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out`` and ``--overwrite`` of every command writing a transformers export."""
    parser.add_argument("--out", type=Path, required=True,
                        help="export folder: new, empty, or a previous export of this command (replaced atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files posttrain did not write there")


def convert_to_export(path: str | Path, out: Path, *, preset: str | None = None, repo_id: str | None = None,
                      overwrite: bool = False) -> Path:
    """Convert a release and write its transformers export (weights, configs, card, identity)."""
    from posttrain.loading import convert_release

    detector, identity = convert_release(path, preset=preset, repo_id=repo_id)
    return transformers_export(detector, identity, out, kind=EXPORT_KIND, overwrite=overwrite)


def transformers_export(detector, identity: dict, out: Path, *, kind: str = EXPORT_KIND,
                        overwrite: bool = False) -> Path:
    """The transformers export of ``detector`` with its card (the stock pipeline's gap stated when its
    normalisation is not the stock extractor's): what ``export --format transformers`` and ``hub convert`` /
    ``hub download`` write (``kind``: the folder's export kind)."""
    from posttrain.hub.card import CardInputs, render_card
    from posttrain.hub.export import export_detector, with_stock_pipeline_gap
    from posttrain.models.detector import count_parameters

    identity = with_stock_pipeline_gap(detector, identity)
    card = render_card(CardInputs(identity=identity, num_parameters=count_parameters(detector)))
    return export_detector(detector, out, identity, card, kind=kind, overwrite=overwrite)


def report(out: Path) -> None:
    import json

    identity = json.loads((out / "posttrain.json").read_text(encoding="utf-8"))
    ignored = identity["source"].get("ignored_pretraining_keys", [])
    print(f"wrote {out} (preset {identity['preset']}, licence {identity['license']}; "
          f"{len(ignored)} pre-training-only keys left out)")


def run(args: argparse.Namespace) -> int:
    from posttrain.hub.folders import check_out_dir

    try:
        check_out_dir(args.out, EXPORT_KIND, overwrite=args.overwrite)  # before the work, not after it
        if not Path(args.path).exists():
            raise FileNotFoundError(f"{args.path}: no such file or folder")
        out = convert_to_export(args.path, args.out, preset=args.preset, overwrite=args.overwrite)
    except ERRORS as error:
        print(f"posttrain hub convert: error: {error}", file=sys.stderr)
        return 2
    report(out)
    return 0
