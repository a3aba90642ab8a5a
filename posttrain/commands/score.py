"""``posttrain score --model M FILE_OR_DIR ...``: score audio files of any format and length.

Per file: P(real), the score (``logit_diff``), the LLR when a calibration is known (``--calibration``
or stored with the model) and a decision: at the calibration's Bayes threshold, or ``logit_diff >= 0``
when uncalibrated (the line above the results says which). Files longer than the window are scored
in windows (``posttrain.eval.scoring``); ``--mode antideepfake`` scores every file whole and alone, as
AntiDeepfake's evaluation does. A file that cannot be read gets an error line and the others are
still scored; the exit code is non-zero only when nothing could be scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.eval.inference import add_arguments

    parser.add_argument("--model", required=True,
                        help="transformers export folder, posttrain checkpoint, AntiDeepfake release or hub id")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR",
                        help="audio files (wav/flac/ogg/mp3/m4a/mp4/...) or folders searched recursively")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json (default: the one stored with the model, if any)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT_JSON", help="also write the results as JSON")
    add_arguments(parser, batch_seconds=100.0)


def run(args: argparse.Namespace) -> int:
    from posttrain.data.files import write_bytes_atomic
    from posttrain.eval.inference import (FileSource, config_from_args, device_from_args, process_group,
                                          run_inference)
    from posttrain.eval.scoring import Decision, logit_diff, p_real, resolve_calibration
    from posttrain.loading import load_model

    with process_group() as info:
        try:
            cfg = config_from_args(args)
            source = FileSource(args.inputs)
            device = device_from_args(args, info)
            model, identity = load_model(args.model, device)
            calibration, calibration_source = resolve_calibration(args.calibration, identity)
            decision = Decision.of(calibration)
        except (ValueError, FileNotFoundError) as error:
            print(f"posttrain score: error: {error}", file=sys.stderr)
            return 2
        result = run_inference(model, source, cfg, device=device, info=info)
    if result is None:
        return 0
    print(f"decision: {decision.rule}")
    print(f"scoring: {cfg.summary()}")
    rows: list[dict] = []
    for out in result.outputs:
        score = float(logit_diff(out.logits))
        llr = None if calibration is None else float(calibration.llr([score])[0])
        row = {"file": out.id, "p_real": float(p_real(out.logits)), "logit_diff": score, "llr": llr,
               "decision": decision.label(score), "seconds": out.seconds, "windows": out.num_windows,
               "logit_fake": float(out.logits[0]), "logit_real": float(out.logits[1])}
        rows.append(row)
        llr_text = "" if llr is None else f"  LLR {llr:+.4f}"
        print(f"{out.id}  P(real) {row['p_real']:.4f}  logit_diff {score:+.4f}{llr_text}  -> {row['decision']}"
              f"  ({out.seconds:.1f} s, {out.num_windows} window{'s' * (out.num_windows != 1)})")
    for item in result.skipped:
        print(f"ERROR {item.id}: {item.reason}: {item.detail}")
    print(f"scored {len(result.outputs)} file(s), {len(result.skipped)} error(s)")
    if args.json is not None:
        document = {"scoring": cfg.summary(), "decision_rule": decision.rule, "threshold_logit_diff": decision.threshold,
                    "calibration_source": calibration_source, "inference": cfg.describe(),
                    "model": identity, "results": rows, "errors": [item.to_dict() for item in result.skipped]}
        write_bytes_atomic(args.json, (json.dumps(document, indent=2, default=str) + "\n").encode("utf-8"))
    return 0 if result.outputs else 1
