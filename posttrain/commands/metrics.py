"""``posttrain metrics``: metrics, plots and result.yaml for any score file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.eval.metrics import DEFAULT_BOOTSTRAP_RESAMPLES, DEFAULT_BOOTSTRAP_SEED, OPERATING_POINTS
    from posttrain.eval.report import GROUPINGS, LOGIT_SCORES

    parser.add_argument("scores", type=Path, help="score file: posttrain, AntiDeepfake (ID,Score,Label) or "
                                                  "plain id,score,label")
    parser.add_argument("--by", nargs="+", action="extend", default=[], choices=sorted(GROUPINGS),
                        help="also report per group (attack groups are scored against all bona fide trials)")
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument("--calibration", type=Path, help="calibration.json mapping scores to LLRs")
    calibration.add_argument("--fit-calibration", type=Path, metavar="DEV_SCORES",
                             help="fit the calibration on this dev score file; saved as OUT/calibration.json")
    parser.add_argument("--dev-split", default=None, metavar="NAME",
                        help="the name of the development split --fit-calibration fits on, stored with the "
                             "calibration and its operating points (default: the dev score file's name)")
    parser.add_argument("--operating-point", choices=OPERATING_POINTS, default=None,
                        help="decide at this operating point of the calibration (fitted on its dev split) instead "
                             "of --threshold: eer, far1 (at most 1 %% of spoofs accepted), frr1, min_dcf")
    parser.add_argument("--prior-bona-fide", type=float, default=0.5,
                        help="prior of the calibration objective (0.5: minimise Cllr)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP_RESAMPLES, metavar="N",
                        help="bootstrap resamples for the EER's 95 %% confidence interval (0: none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_BOOTSTRAP_SEED, help="bootstrap seed")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold for accuracy/precision/recall/F1 (default: the EER threshold)")
    parser.add_argument("--logit-score", choices=LOGIT_SCORES, default="logit_diff",
                        help="score taken from a [fake, real] logit pair")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: <scores folder>/<scores name>_metrics)")


def run(args: argparse.Namespace) -> int:
    from posttrain.eval.calibration import CalibrationError, fit_calibration, load_calibration, save_calibration
    from posttrain.eval.report import ScoreFileError, file_sha256, read_scores, write_report

    out_dir = args.out or args.scores.parent / f"{args.scores.stem}_metrics"
    try:
        table = read_scores(args.scores, logit_score=args.logit_score)
        calibration = None
        if args.calibration is not None:
            calibration = load_calibration(args.calibration)
        elif args.fit_calibration is not None:
            dev = read_scores(args.fit_calibration, logit_score=args.logit_score)
            refuse_test_trials(dev.ids, table.ids, args.fit_calibration, args.scores)
            calibration = fit_calibration(
                dev.scores, dev.labels, prior_bona_fide=args.prior_bona_fide,
                score_definition=dev.score_definition, dev_split=args.dev_split or args.fit_calibration.stem,
                fitted_on={"path": str(args.fit_calibration), "sha256": file_sha256(args.fit_calibration)})
            save_calibration(calibration, out_dir / "calibration.json")
        if calibration is not None and calibration.score_definition not in ("", table.score_definition):
            raise CalibrationError(f"the calibration maps {calibration.score_definition!r} but "
                                   f"{args.scores} holds {table.score_definition!r}")
        threshold = args.threshold
        if args.operating_point is not None:
            if calibration is None:
                raise CalibrationError(f"--operating-point {args.operating_point}: needs a calibration with operating "
                                       "points (--calibration, or --fit-calibration DEV_SCORES --dev-split NAME)")
            threshold = calibration.operating_threshold(args.operating_point)
    except (ScoreFileError, CalibrationError, ValueError) as error:
        print(f"posttrain metrics: error: {error}", file=sys.stderr)
        return 2
    report = write_report(
        out_dir, table, score_definition=table.score_definition,
        model_identity={"recorded": False, "note": "posttrain metrics reads scores only"},
        data_identity={"score_file": str(args.scores), "format": table.source_format, "trials": len(table)},
        group_by=list(dict.fromkeys(args.by)), calibration=calibration, score_file=args.scores,
        bootstrap_resamples=args.bootstrap, seed=args.seed, threshold=threshold)
    print(report["table"], end="")
    print(f"report: {out_dir}")
    return 0


def refuse_test_trials(dev_ids: list[str], test_ids: list[str], dev_path: Path, test_path: Path) -> None:
    """A calibration or threshold fitted on trials of the reported test set makes its numbers silently
    optimistic: refused, naming both files."""
    shared = set(dev_ids) & set(test_ids)
    if shared:
        from posttrain.eval.calibration import CalibrationError

        raise CalibrationError(f"--fit-calibration {dev_path} shares {len(shared)} of its {len(dev_ids)} trials with "
                               f"{test_path} (e.g. {sorted(shared)[0]!r}): a calibration or threshold fitted on the "
                               "test set gives optimistic numbers; fit it on a development split")
