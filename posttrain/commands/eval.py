"""``posttrain eval --model M (--protocol CSV --root DIR | --shards DIR) --out DIR``: score a test set
and write the report (score file, metrics.json, table, DET and histogram plots, result.yaml).

Runs on several ranks under torchrun (each rank scores a disjoint share; rank 0 writes the report).
The score of record is the model's (``logit_diff``, real logit minus fake logit; ``cosine`` for a one-class
head); with a calibration (given, or stored with the model, and fitted on that score) actDCF and Cllr are
computed on its LLRs. ``--mode antideepfake`` scores every
file whole and alone (AntiDeepfake's test protocol) instead of in batched 13 s windows; the report
(table, metrics.json, result.yaml) names the mode that produced it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands.inference_options import add_arguments
    from posttrain.eval.metrics import DEFAULT_BOOTSTRAP_RESAMPLES, DEFAULT_BOOTSTRAP_SEED
    from posttrain.eval.report import GROUPINGS

    parser.add_argument("--model", required=True,
                        help="transformers export folder, posttrain checkpoint, AntiDeepfake release or hub id")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--protocol", type=Path, help="protocol CSV of the test set")
    data.add_argument("--shards", type=Path, help="shard folder (index.json) of the test set")
    parser.add_argument("--root", type=Path, default=None, help="data root replacing $ROOT in protocol paths")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not attach the metrics and report files to the MLflow run that trained the model "
                             "(attached when the model is a checkpoint of a tracked run)")
    parser.add_argument("--by", nargs="+", action="extend", default=[], choices=sorted(GROUPINGS),
                        help="also report per group")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json (default: the one stored with the model, if any)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP_RESAMPLES, metavar="N",
                        help="bootstrap resamples for the EER's 95 %% confidence interval (0: none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_BOOTSTRAP_SEED, help="bootstrap seed")
    parser.add_argument("--segments", type=Path, default=None, metavar="SEGMENTS_CSV",
                        help="true segments of a partial-spoof set (`posttrain data partialspoof`): also report "
                             "segment-level EER per PartialSpoof resolution and how well the fake regions are "
                             "located; needs windows with a hop <= 0.64 s (default: none)")
    add_arguments(parser)


def _segment_truth(path: Path | None, cfg) -> tuple[dict, dict] | None:
    """(spoofed spans, length in samples) per file ID of ``--segments``, read (and the hop checked)
    before any scoring, so a bad file or option fails at once."""
    from posttrain.data.partialspoof import read_segments, spoof_regions
    from posttrain.eval.segments import supported_resolutions

    if path is None:
        return None
    if cfg.mode == "antideepfake" or cfg.window.window_seconds == 0:
        raise UserError("--segments needs windowed scoring: whole-file scoring (--window-seconds 0, --mode "
                        "antideepfake) has no timeline to locate fake segments in; drop --segments, or score in "
                        "windows (e.g. --window-seconds 4 --hop-seconds 0.32)")
    supported_resolutions(cfg.window.hop_seconds)
    sidecar = read_segments(path)
    return ({file_id: spoof_regions(segments) for file_id, segments in sidecar.items()},
            {file_id: segments[-1].stop for file_id, segments in sidecar.items()})


def _check_inputs(args: argparse.Namespace):
    """Everything that can be checked without torch: options, the test set, the model's location, the
    segments file. Returns ``(InferenceConfig, segment truth)``."""
    from posttrain.commands.inference_options import config_from_args
    from posttrain.data.protocol import read_protocol
    from posttrain.data.shards import load_index
    from posttrain.hubcache import locate_model

    cfg = config_from_args(args)
    if args.protocol is not None:
        read_protocol(args.protocol)
    else:
        load_index(args.shards)
    locate_model(args.model)
    return cfg, _segment_truth(args.segments, cfg)


def run(args: argparse.Namespace) -> int:
    cfg, truth = _check_inputs(args)  # a bad input is one line and exit 2 before torch loads
    from posttrain.commands.inference_options import device_from_args
    from posttrain.dist import process_group
    from posttrain.eval.inference import ProtocolSource, ShardSource, run_inference
    from posttrain.eval.report import SCORE_TYPES, write_report
    from posttrain.eval.scoring import Decision, resolve_calibration, score_record
    from posttrain.eval.segments import evaluate_segments
    from posttrain.loading import load_scorer

    with process_group() as info:
        try:
            source = ShardSource(args.shards) if args.shards else ProtocolSource(
                args.protocol, args.root, max_file_seconds=args.max_file_seconds)
            device = device_from_args(args, info)
            model, identity = load_scorer(args.model, device, backend=cfg.backend)
            scoring = model.score_definition
            definition = SCORE_TYPES[scoring.name]
            calibration, calibration_source = resolve_calibration(args.calibration, identity, scoring)
        except (ValueError, FileNotFoundError) as error:  # config, protocol, shard, model, calibration errors
            print(f"posttrain eval: error: {error}", file=sys.stderr)
            return 2
        result = run_inference(model, source, cfg, device=device, info=info)
        if result is None:  # not rank 0: the report is rank 0's
            return 0
        if not result.outputs:
            print(f"posttrain eval: error: no sample could be scored ({len(result.skipped)} skipped)", file=sys.stderr)
            return 1
        records = [score_record(out.id, out.logits, out.meta, scoring) for out in result.outputs]
        segments = None if truth is None else evaluate_segments(
            result.outputs, *truth, hop_seconds=cfg.window.hop_seconds,
            threshold=Decision.of(calibration, definition=scoring).threshold, definition=scoring)
        data_identity = {**source.identity(), "scored": len(result.outputs), "skipped": len(result.skipped),
                         "audio_seconds": result.seconds, "windows": result.windows, "world_size": info.world_size,
                         "inference": cfg.describe(), "calibration_source": calibration_source}
        report = write_report(args.out, records, score_definition=definition, model_identity=identity,
                              data_identity=data_identity, skipped=[s.to_dict() for s in result.skipped],
                              group_by=list(dict.fromkeys(args.by)), calibration=calibration,
                              bootstrap_resamples=args.bootstrap, seed=args.seed, scoring=cfg.summary(),
                              segments=segments)
    print(report["table"], end="")
    for item in result.skipped:
        print(f"skipped {item.id}: {item.reason}: {item.detail}")
    print(f"scored {len(result.outputs)}, skipped {len(result.skipped)}; report: {args.out}")
    if not args.no_mlflow:
        print(attach_to_training_run(identity, args.out.name, report["metrics"], report["files"]))
    return 0


def attach_to_training_run(identity: dict, name: str, document: dict, files: dict) -> str:
    """Attach a report to the MLflow run that trained the model, when there is one; the line saying so."""
    from posttrain.train.tracking import NotAttached, log_report, training_run

    try:
        cfg, run_id = training_run(identity)
        log_report(cfg, run_id, name, document, files)
    except NotAttached as why:
        return f"MLflow: not attached to a training run ({why})"
    return (f"MLflow: test metrics (test/{name}/...) and the report files (eval/{name}/) attached to the training "
            f"run {run_id} ({cfg.tracking_uri})")
