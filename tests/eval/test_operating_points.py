"""Named operating points (EER, FAR 1 %, FRR 1 %, minDCF): thresholds fitted on a named development split,
stored with the calibration, chosen by name in ``metrics`` and ``score``; a dev set holding test trials is
refused; ``score`` reports each file's window spread."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf

from posttrain.cli import main
from posttrain.eval.calibration import fit_calibration, load_calibration, save_calibration
from posttrain.eval.metrics import eer, operating_points
from posttrain.eval.report import ScoreTable, write_scores


def _brute_force(bona: np.ndarray, spoof: np.ndarray, rate: float = 0.01) -> dict[str, float]:
    """Every realisable threshold tried in turn (accept when score >= t; +inf accepts nothing)."""
    thresholds = sorted(set(bona.tolist()) | set(spoof.tolist())) + [math.inf]
    rates = [(t, sum(s >= t for s in spoof) / len(spoof), sum(b < t for b in bona) / len(bona)) for t in thresholds]
    far1 = min(t for t, far, _ in rates if far * len(spoof) <= rate * len(spoof) + 1e-9)
    frr1 = max(t for t, _, frr in rates if frr * len(bona) <= rate * len(bona) + 1e-9)
    return {"far1": far1, "frr1": frr1}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_operating_points_are_the_realisable_thresholds_a_search_finds(seed):
    rng = np.random.default_rng(seed)
    bona = np.round(rng.normal(1.5, 1.0, 250), 1)  # rounded: many ties, within and across classes
    spoof = np.round(rng.normal(-1.5, 1.0, 410), 1)
    points = operating_points(bona, spoof)
    expected = _brute_force(bona, spoof)
    for name in ("far1", "frr1"):
        assert points[name]["threshold"] == expected[name], name
        threshold = points[name]["threshold"]
        assert points[name]["far"] == np.mean(spoof >= threshold) and points[name]["frr"] == np.mean(bona < threshold)
    assert points["far1"]["far"] <= 0.01 and points["frr1"]["frr"] <= 0.01
    # without ties the EER point decides as the EER counts: its rates average to the EER (a tie group the
    # EER's cut splits is accepted or rejected whole by a real threshold)
    bona, spoof = rng.normal(1.0, 1.0, 250), rng.normal(-1.0, 1.0, 410)
    points, (rate, _) = operating_points(bona, spoof), eer(bona, spoof)
    assert (points["eer"]["far"] + points["eer"]["frr"]) / 2 == pytest.approx(rate, abs=1e-12)


def test_operating_points_travel_with_the_calibration_and_its_split_name(tmp_path):
    rng = np.random.default_rng(3)
    scores = np.r_[rng.normal(2, 1, 200), rng.normal(-2, 1, 200), [50.0]]  # a spoof above every bona fide
    labels = np.r_[np.ones(200), np.zeros(201)].astype(int)
    calibration = fit_calibration(scores, labels, dev_split="asv19la_dev")
    assert calibration.operating_points["far1"]["far"] <= 0.01
    loaded = load_calibration(save_calibration(calibration, tmp_path / "calibration.json"))
    assert loaded.dev_split == "asv19la_dev" and loaded.operating_points == calibration.operating_points
    with pytest.raises(ValueError, match=r"operating point 'far5'.*asv19la_dev"):
        loaded.operating_threshold("far5")


def _table(prefix: str, seed: int) -> ScoreTable:
    rng = np.random.default_rng(seed)
    records = [{"id": f"{prefix}{i:04d}", "score": float(rng.normal(2.0 if i % 2 else -2.0, 1.0)), "label": i % 2,
                "score_type": "logit_diff"} for i in range(400)]
    return ScoreTable.from_records(records)


def test_metrics_decides_at_a_named_point_and_refuses_a_dev_set_of_test_trials(tmp_path, capsys):
    write_scores(tmp_path / "test.csv", _table("T-", 0))
    write_scores(tmp_path / "dev.csv", _table("D-", 1))
    assert main(["metrics", str(tmp_path / "test.csv"), "--fit-calibration", str(tmp_path / "dev.csv"),
                 "--dev-split", "dev-2026", "--operating-point", "far1", "--bootstrap", "0",
                 "--out", str(tmp_path / "report")]) == 0
    calibration = load_calibration(tmp_path / "report" / "calibration.json")
    assert calibration.dev_split == "dev-2026"
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["pooled"]["decision"]["threshold"] == calibration.operating_points["far1"]["threshold"]
    capsys.readouterr()
    # the test set fitted as its own dev set: refused in one line naming both files
    assert main(["metrics", str(tmp_path / "test.csv"), "--fit-calibration", str(tmp_path / "test.csv"),
                 "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "shares 400 of its 400 trials" in error and "test.csv" in error
    assert not (tmp_path / "bad" / "calibration.json").exists()


def test_score_decides_at_the_operating_point_and_reports_the_window_spread(tiny_export_dir, tmp_path, capsys):
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(16000 * 9)).astype(np.float32), 16000)
    files = [str(tmp_path / f"{name}.wav") for name in ("a", "b", "c")]
    windows = ["--window-seconds", "3", "--hop-seconds", "3"]  # three windows per 9 s file
    assert main(["score", "--model", str(tiny_export_dir), *files, *windows, "--no-progress", "--json",
                 str(tmp_path / "raw.json")]) == 0
    raw = [row["logit_diff"] for row in json.loads((tmp_path / "raw.json").read_text())["results"]]
    # a dev split whose far1 threshold falls between the files' scores
    middle = sorted(raw)[1]
    dev_scores = np.r_[np.full(300, middle + 1.0), np.full(297, middle - 1.0), np.full(3, middle)]
    dev_labels = np.r_[np.ones(300), np.zeros(300)].astype(int)
    calibration = fit_calibration(dev_scores, dev_labels, dev_split="dev-x")
    threshold = calibration.operating_points["far1"]["threshold"]
    assert threshold == middle  # three of 300 spoofs at the middle score: exactly 1 % accepted
    save_calibration(calibration, tmp_path / "calibration.json")
    capsys.readouterr()
    assert main(["score", "--model", str(tiny_export_dir), *files, *windows, "--no-progress", "--calibration",
                 str(tmp_path / "calibration.json"), "--operating-point", "far1", "--json", str(tmp_path / "op.json"),
                 "--timeline", str(tmp_path / "timelines")]) == 0
    document = json.loads((tmp_path / "op.json").read_text())
    assert document["operating_point"] == "far1" and "far1 fitted on dev-x" in document["decision_rule"]
    for row in document["results"]:
        assert row["decision"] == ("real" if row["logit_diff"] >= threshold else "fake")
        timeline = json.loads((tmp_path / "timelines" / f"{row['file'].rsplit('/', 1)[-1]}.timeline.json")
                              .read_text())["windows"]
        assert len(timeline) == 3
        assert row["window_spread"] == pytest.approx(np.std([w["logit_diff"] for w in timeline], ddof=1), abs=1e-9)
    assert {row["decision"] for row in document["results"]} == {"real", "fake"}
    # without a calibration an operating point is a one-line error
    assert main(["score", "--model", str(tiny_export_dir), files[0], "--no-progress", "--operating-point",
                 "far1"]) == 2
    assert "--operating-point far1: the model carries no calibration" in capsys.readouterr().err
