"""``posttrain metrics`` run as a user would, in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from posttrain.eval.calibration import load_calibration
from posttrain.eval.metrics import compute_metrics
from posttrain.eval.report import ScoreTable, write_scores

pytestmark = pytest.mark.slow


def score_table(seed, n=240, prefix=""):
    """Miscalibrated logit differences; corpus B is easier than A, attack A02 harder than A01."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        label = i % 2
        corpus = "A" if i % 3 else "B"
        attack = "-" if label else ("A01" if i % 4 == 0 else "A02")
        centre = (2.0 if label else (-2.0 if attack == "A01" else -0.5)) * (1.5 if corpus == "B" else 1.0)
        diff = 3.0 * rng.normal(centre, 1.0) + 1.0
        records.append({"id": f"{prefix}{corpus}-u{i:04d}", "score": diff, "label": label, "attack": attack,
                        "language": "en" if i % 5 else "fr", "score_type": "logit_diff",
                        "logit_fake": -diff / 2, "logit_real": diff / 2})
    return ScoreTable.from_records(records)


def posttrain(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "posttrain", "metrics", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_metrics_command_writes_the_full_report(tmp_path):
    test, dev = score_table(0), score_table(1, prefix="dev-")
    write_scores(tmp_path / "test.csv", test)
    write_scores(tmp_path / "dev.csv", dev)
    out = tmp_path / "report"
    done = posttrain(tmp_path / "test.csv", "--by", "corpus", "attack", "--by", "language",
                     "--fit-calibration", tmp_path / "dev.csv", "--bootstrap", "100", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    calibration = load_calibration(out / "calibration.json")
    expected = compute_metrics(test.scores, test.labels, calibration.llr(test.scores), bootstrap_resamples=100)
    for name in ("eer", "min_dcf", "auc", "act_dcf", "cllr", "raw_cllr", "eer_ci"):
        assert metrics["pooled"][name] == expected[name], name
    assert metrics["pooled"]["cllr"] < metrics["pooled"]["raw_cllr"]  # the raw "LLRs" are 3x overconfident
    groups = metrics["groups"]
    assert groups["corpus"]["B"]["eer"] < groups["corpus"]["A"]["eer"]
    assert groups["attack"]["A01"]["eer"] < groups["attack"]["A02"]["eer"]
    assert set(groups["language"]) == {"en", "fr"}

    table = (out / "metrics.txt").read_text()
    assert table in done.stdout
    assert "attack=A02" in table and "actDCF/Cllr on: calibrated" in table
    for name in ("det.png", "histograms.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert imread(out / name).shape[0] > 200

    result = yaml.safe_load((out / "result.yaml").read_text())
    assert result["score_file"]["sha256"] == hashlib.sha256((tmp_path / "test.csv").read_bytes()).hexdigest()
    assert result["score_file"]["format"] == "posttrain"
    assert result["counts"]["trials"] == 240 and result["counts"]["bona_fide"] == 120
    assert result["score_definition"] == "real logit minus fake logit"
    dev_sha256 = hashlib.sha256((tmp_path / "dev.csv").read_bytes()).hexdigest()
    assert result["calibration"]["fitted_on"]["sha256"] == dev_sha256

    # the saved calibration is reused as is, and the default report folder sits next to the scores
    again = posttrain("test.csv", "--calibration", out / "calibration.json", "--by", "corpus", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    reused = json.loads((tmp_path / "test_metrics" / "metrics.json").read_text())
    assert reused["pooled"]["cllr"] == metrics["pooled"]["cllr"]


def test_metrics_command_reports_a_bad_line(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text('ID,Score,Label\nX-1,"[0.1, 0.9]",1\nX-2,"[0.8, oops]",0\n')
    done = posttrain(path, cwd=tmp_path)
    assert done.returncode == 2
    assert f"{path}:3:" in done.stderr and "logit" in done.stderr
    assert not (tmp_path / "scores_metrics").exists()
