"""``posttrain score --model M FILE_OR_DIR ...``: score audio files of any format and length.

Per file: P(real), the score (the model's: ``logit_diff``, or ``cosine`` for a one-class head, whose P(real)
only comes from a calibration), the LLR when a calibration is known (``--calibration`` or stored with the
model) and a decision: at the calibration's Bayes threshold, or the score's own uncalibrated one
(``logit_diff >= 0``; the OC margins' midpoint) (the line above the results says which). Files longer
than the window are scored in windows (``posttrain.eval.scoring``); ``--mode antideepfake`` scores every
file whole and alone, as AntiDeepfake's evaluation does. A file that cannot be read gets an error line and
the others are still scored; the exit code is non-zero only when nothing could be scored. Near-silent input gets a
WARNING line (its score says nothing). ``--scores-out`` with ``--labels`` writes the score file
``posttrain eval`` writes and ``posttrain metrics`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands.inference_options import add_arguments
    from posttrain.eval.metrics import OPERATING_POINTS

    parser.add_argument("--model", required=True,
                        help="transformers export folder, posttrain checkpoint, AntiDeepfake release or hub id")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR",
                        help="audio files (wav/flac/ogg/mp3/m4a/mp4/...) or folders searched recursively")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json (default: the one stored with the model, if any)")
    parser.add_argument("--operating-point", choices=OPERATING_POINTS, default=None,
                        help="decide at this operating point of the calibration, fitted on its named dev split "
                             "(`posttrain metrics --fit-calibration DEV --dev-split NAME`): eer, far1 (at most 1 %% "
                             "of spoofs accepted there), frr1, min_dcf (default: the calibration's Bayes threshold)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT_JSON", help="also write the results as JSON")
    parser.add_argument("--scores-out", type=Path, default=None, metavar="SCORES_CSV",
                        help="also write a score file in the format `posttrain eval` writes and `posttrain metrics` "
                             "reads; needs --labels (default: none)")
    parser.add_argument("--labels", type=Path, default=None, metavar="PROTOCOL_CSV",
                        help="protocol CSV whose rows give each scored file's ID, label and groups, matched by "
                             "path (default: none)")
    parser.add_argument("--root", type=Path, default=None, help="data root replacing $ROOT in --labels (default: none)")
    parser.add_argument("--timeline", type=Path, default=None, metavar="DIR",
                        help="also write per file the score of every window (NAME.timeline.csv/.json, calibrated "
                             "when a calibration is known) and a PNG of it with the threshold and the regions "
                             "called fake into DIR (default: none)")
    add_arguments(parser, batch_seconds=100.0)


def _read_labels(args: argparse.Namespace) -> list | None:
    """The protocol rows of ``--labels`` (read before any scoring, so a bad file fails at once)."""
    from posttrain.data.protocol import read_protocol
    from posttrain.errors import UserError

    if args.scores_out is not None and args.labels is None:
        raise UserError("--scores-out needs --labels PROTOCOL_CSV: a score file's trials need labels")
    return None if args.labels is None else read_protocol(args.labels)


def window_spread(out, scoring) -> float | None:
    """The file's uncertainty: the standard deviation of its window scores (the score's units; None for one
    window). The windows are separate looks at the same file, so a spread as large as the distance to the
    threshold says the file's evidence disagrees with itself (a partly spoofed or unstable recording), which
    one aggregated score hides; it needs no extra forward pass, unlike test-time augmentation."""
    import numpy as np

    if out.window_logits is None or len(out.window_logits) < 2:
        return None
    return float(np.std(scoring.scores(out.window_logits), ddof=1))


def timeline_stems(ids: list[str]) -> list[str]:
    """A file-name stem per scored file: its name, numbered by position where two names collide."""
    names = [Path(file_id).name for file_id in ids]
    return [name if names.count(name) == 1 else f"{position:04d}-{name}" for position, name in enumerate(names)]


def _write_timelines(directory: Path, outputs: list, rows: list[dict], decision, calibration, scoring) -> None:
    from posttrain.eval.timeline import timeline_of, write_timeline

    for out, row, stem in zip(outputs, rows, timeline_stems([out.id for out in outputs])):
        paths = write_timeline(timeline_of(out, decision, calibration, scoring), directory, stem)
        row["timeline"] = {kind: str(path) for kind, path in paths.items()}
    print(f"timelines: {len(outputs)} file(s) in {directory} (NAME.timeline.csv/.json/.png)")


def checked_inputs(args: argparse.Namespace) -> tuple[list[Path], list | None]:
    """``(the audio files to score, the --labels rows)``, checked before torch or a model loads: every
    file is probed from its header (a missing file or a sample rate out of range is the user's to fix:
    one line naming the file, exit 2; a corrupt body stays a per-file error while scoring, and the rest
    are still scored), the model's location is found, and with ``--labels`` every file must have a row."""
    from posttrain.commands.inference_options import config_from_args
    from posttrain.data.audio import AudioError, audio_inputs, probe
    from posttrain.errors import UserError
    from posttrain.hubcache import locate_model

    config_from_args(args)
    paths = audio_inputs(args.inputs)
    for path in paths:
        try:
            probe(path)
        except AudioError as error:
            if error.reason in ("missing", "rate_out_of_range"):
                raise UserError(f"{error.detail} (nothing was scored: fix or drop this input)") from None
    labels = _read_labels(args)
    if labels is not None:
        by_path = {row.resolved_path(args.root).resolve() for row in labels}
        unlabelled = [str(path) for path in paths if path.resolve() not in by_path]
        if unlabelled:
            raise UserError(f"--labels {args.labels}: no row for {len(unlabelled)} of the {len(paths)} files, e.g. "
                            f"{unlabelled[0]} (a score file needs every trial's label; nothing was scored)")
    locate_model(args.model)
    return paths, labels


def run(args: argparse.Namespace) -> int:
    paths, labels = checked_inputs(args)  # a bad input is one line and exit 2 before torch loads
    from posttrain.commands.inference_options import config_from_args, device_from_args
    from posttrain.data.files import write_bytes_atomic
    from posttrain.dist import process_group
    from posttrain.eval.inference import FileSource, run_inference
    from posttrain.eval.scoring import (NEAR_SILENT_DBFS, Decision, labelled_file_records, logit_columns, near_silent,
                                        p_real, resolve_calibration)
    from posttrain.loading import load_scorer

    with process_group() as info:
        try:
            cfg = config_from_args(args)
            source = FileSource(paths, max_file_seconds=args.max_file_seconds)
            device = device_from_args(args, info)
            model, identity = load_scorer(args.model, device, backend=cfg.backend)
            scoring = model.score_definition
            calibration, calibration_source = resolve_calibration(args.calibration, identity, scoring)
            decision = Decision.of(calibration, definition=scoring, operating_point=args.operating_point)
        except (ValueError, FileNotFoundError) as error:
            print(f"posttrain score: error: {error}", file=sys.stderr)
            return 2
        result = run_inference(model, source, cfg, device=device, info=info)
    if result is None:
        return 0
    print(f"decision: {decision.rule}")
    print(f"scoring: {cfg.summary()}")
    if not scoring.logits and calibration is None:
        print(f"P(real): none (a {scoring.name} is no probability): fit a calibration on scored dev files "
              f"(`posttrain metrics --fit-calibration`) and pass it as --calibration")
    rows: list[dict] = []
    for out in result.outputs:
        score = float(scoring.scores(out.logits))
        llr = None if calibration is None else float(calibration.llr([score])[0])
        probability = p_real(out.logits, scoring, calibration)
        row = {"file": out.id, "p_real": None if probability is None else float(probability), scoring.name: score,
               "llr": llr, "decision": decision.label(score), "seconds": out.seconds, "windows": out.num_windows,
               "window_spread": window_spread(out, scoring),
               **(logit_columns(out.logits) if scoring.logits else {})}
        row.update(level_dbfs=out.meta.get("level_dbfs"), near_silent=near_silent(out.meta),
                   warnings=list(out.meta.get("warnings", ())))
        rows.append(row)
        llr_text = "" if llr is None else f"  LLR {llr:+.4f}"
        p_text = "-" if row["p_real"] is None else f"{row['p_real']:.4f}"
        print(f"{out.id}  P(real) {p_text}  {scoring.name} {score:+.4f}{llr_text}  -> {row['decision']}"
              f"  ({out.seconds:.1f} s, {out.num_windows} window{'s' * (out.num_windows != 1)})")
        if row["near_silent"]:
            print(f"WARNING {out.id}: near-silent input ({row['level_dbfs']:.0f} dBFS RMS, below "
                  f"{NEAR_SILENT_DBFS:g}): the model normalises the level away, so this score says nothing "
                  f"about the recording")
        for warning in row["warnings"]:
            print(f"WARNING {out.id}: {warning}")
    if args.timeline is not None:
        _write_timelines(args.timeline, result.outputs, rows, decision, calibration, scoring)
    for item in result.skipped:
        print(f"ERROR {item.id}: {item.reason}: {item.detail}")
    quiet = sum(row["near_silent"] for row in rows)
    print(f"scored {len(result.outputs)} file(s), {len(result.skipped)} error(s)"
          + (f", {quiet} near-silent (flagged above)" if quiet else ""))
    if args.scores_out is not None:
        from posttrain.eval.report import ScoreTable, write_scores

        write_scores(args.scores_out, ScoreTable.from_records(
            labelled_file_records(result.outputs, labels, args.root, str(args.labels), scoring)))
        print(f"score file: {args.scores_out} (`posttrain metrics {args.scores_out}`)")
    if args.json is not None:
        document = {"scoring": cfg.summary(), "decision_rule": decision.rule, "score_definition": scoring.name,
                    "operating_point": args.operating_point,
                    decision.threshold_key: decision.threshold, "calibration_source": calibration_source,
                    "inference": cfg.describe(),
                    "model": identity, "results": rows, "errors": [item.to_dict() for item in result.skipped]}
        write_bytes_atomic(args.json, (json.dumps(document, indent=2, default=str) + "\n").encode("utf-8"))
    return 0 if result.outputs else 1
