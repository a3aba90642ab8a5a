"""``posttrain publish --checkpoint CKPT --out DIR``: a stock transformers model with its card.

The checkpoint is consolidated to fp32 (any model accepted by ``--model`` works too: an export or an
AntiDeepfake release), exported as ``*ForSequenceClassification`` + feature extractor, and described by
a model card built from the training config, the training shard indexes and the given ``result.yaml``
files. ``--push`` uploads the folder with huggingface_hub (token from ``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.commands.hub_convert import add_out_option

EXPORT_KIND = "publish"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="DeepSpeed checkpoint folder or tag folder (or any model spec posttrain accepts)")
    add_out_option(parser)
    parser.add_argument("--results", type=Path, nargs="+", action="extend", default=[], metavar="RESULT_YAML",
                        help="result.yaml of each test set, shown on the card")
    parser.add_argument("--calibration", type=Path, default=None, help="calibration.json published with the model")
    parser.add_argument("--shards", nargs="+", default=None, metavar="DIR",
                        help="training shard folders for the card's data table (default: the training config's)")
    parser.add_argument("--repo-id", default=None, help="hub repository ORG/NAME (named on the card; needed by --push)")
    parser.add_argument("--push", action="store_true", help="upload the folder to --repo-id")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not log the exported folder (with its card) to the MLflow run that trained it")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")


def attach_model(identity: dict, folder: Path) -> str:
    """Log the exported folder to the MLflow run that trained the model, when there is one."""
    from posttrain.train.tracking import NotAttached, log_model, training_run

    try:
        cfg, run_id = training_run(identity)
        log_model(cfg, run_id, folder)
    except NotAttached as why:
        return f"MLflow: model not logged to a training run ({why})"
    return f"MLflow: the exported model (model/, with its card) logged to the training run {run_id} ({cfg.tracking_uri})"


def run(args: argparse.Namespace) -> int:
    from posttrain.hub.folders import check_out_dir
    from posttrain.hubcache import locate_model

    if args.push and not args.repo_id:
        print("posttrain publish: error: --push needs --repo-id ORG/NAME", file=sys.stderr)
        return 2
    check_out_dir(args.out, EXPORT_KIND, overwrite=args.overwrite)  # before the work (and torch), not after it
    locate_model(args.checkpoint)
    from posttrain.hub.card import CardInputs, read_result, render_card, training_data
    from posttrain.hub.export import export_detector, with_stock_pipeline_gap
    from posttrain.hub.publish import calibration_entry, push_to_hub, training_shards
    from posttrain.loading import load_model
    from posttrain.models.detector import count_parameters

    try:
        results = [read_result(path) for path in args.results]
        detector, identity = load_model(args.checkpoint)
        identity.pop("loaded_from")  # where it was read this time: not part of the published identity
        training_identity = dict(identity)
        if args.calibration is not None:
            identity["calibration"] = calibration_entry(args.calibration)
        identity = with_stock_pipeline_gap(detector, identity)
        shards = args.shards if args.shards is not None else training_shards(identity)
        card = render_card(CardInputs(identity=identity, num_parameters=count_parameters(detector),
                                      repo_id=args.repo_id, results=results,
                                      training_data=training_data(shards) if shards else None))
        out = export_detector(detector, args.out, identity, card, kind=EXPORT_KIND,
                              overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:  # incl. Calibration/Conversion/Export errors
        print(f"posttrain publish: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if not args.no_mlflow:
        print(attach_model(training_identity, out))
    if args.push:
        print(f"pushed to {push_to_hub(out, args.repo_id, private=args.private)}")
    return 0
