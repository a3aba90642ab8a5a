"""``posttrain hub convert PATH --out DIR``: a local AntiDeepfake checkpoint (fairseq-layout
``model.safetensors`` or SpeechBrain ``.ckpt``, or a folder holding one) -> a transformers export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ERRORS = (ValueError, FileNotFoundError)  # ConversionError / ExportError / ModelNotAvailableError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model.safetensors / .ckpt file, or a folder holding one")
    add_output_options(parser)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="export folder (replaced if it exists)")
    parser.add_argument("--preset", default=None,
                        help="preset among those with the checkpoint's shape (default: read from the weights)")


def convert_to_export(path: str | Path, out: Path, *, preset: str | None = None,
                      repo_id: str | None = None) -> Path:
    """Convert a release and write its transformers export (weights, configs, card, identity)."""
    from posttrain.hub.card import CardInputs, render_card
    from posttrain.hub.export import export_detector
    from posttrain.models.detector import count_parameters
    from posttrain.loading import convert_release

    detector, identity = convert_release(path, preset=preset, repo_id=repo_id)
    card = render_card(CardInputs(identity=identity, num_parameters=count_parameters(detector)))
    return export_detector(detector, out, identity, card)


def report(out: Path) -> None:
    import json

    identity = json.loads((out / "posttrain.json").read_text(encoding="utf-8"))
    ignored = identity["source"].get("ignored_pretraining_keys", [])
    print(f"wrote {out} (preset {identity['preset']}, licence {identity['license']}; "
          f"{len(ignored)} pre-training-only keys left out)")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_to_export(args.path, args.out, preset=args.preset)
    except ERRORS as error:
        print(f"posttrain hub convert: error: {error}", file=sys.stderr)
        return 2
    report(out)
    return 0
