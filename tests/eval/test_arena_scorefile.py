"""The Speech Anti-Spoofing Arena's ``scores.txt`` from every report: one ``<utterance_id> <score>`` line per
trial, higher = more bona fide, so an EER computed from it (with the labels the Arena holds) is the report's."""

import logging

import numpy as np
import yaml

from posttrain.eval.arena_scorefile import ARENA_SCORES
from posttrain.eval.report import write_report


def _records(count=40, seed=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    scores = rng.normal(size=count) + 1.5 * labels
    return [{"id": f"LA_E_{i:07d}", "score": float(s), "label": int(y), "logit_fake": -float(s) / 2,
             "logit_real": float(s) / 2} for i, (s, y) in enumerate(zip(scores, labels))]


def _independent_eer(scores: dict[str, float], labels: dict[str, int]) -> float:
    """The ASVspoof EER by a sweep over every score as threshold (accept bona fide at score >= t)."""
    bona = np.array([scores[i] for i in scores if labels[i] == 1])
    spoof = np.array([scores[i] for i in scores if labels[i] == 0])
    best = None
    for threshold in sorted(set(scores.values())) + [np.inf]:
        frr, far = np.mean(bona < threshold), np.mean(spoof >= threshold)
        if best is None or abs(frr - far) < best[0]:
            best = (abs(frr - far), (frr + far) / 2)
    return best[1]


def test_the_arena_file_holds_every_trial_and_gives_the_reports_eer(tmp_path):
    records = _records()
    report = write_report(tmp_path, records, score_definition="s", model_identity={}, data_identity={},
                          bootstrap_resamples=0)
    written = tmp_path / ARENA_SCORES
    assert report["files"]["arena_scores"] == written
    assert yaml.safe_load((tmp_path / "result.yaml").read_text())["files"]["arena_scores"] == ARENA_SCORES
    lines = written.read_text().splitlines()
    parsed = {sample_id: float(score) for sample_id, score in (line.split(" ") for line in lines)}
    assert list(parsed) == [r["id"] for r in records]  # one line per trial, in order, no header
    assert parsed == {r["id"]: r["score"] for r in records}  # the score round-trips exactly
    labels = {r["id"]: r["label"] for r in records}
    assert _independent_eer(parsed, labels) == report["metrics"]["pooled"]["eer"]


def test_an_id_with_whitespace_leaves_the_file_out_with_a_warning(tmp_path, caplog):
    records = _records(6)
    records[2]["id"] = "clip 2.wav"
    with caplog.at_level(logging.WARNING):
        report = write_report(tmp_path, records, score_definition="s", model_identity={}, data_identity={},
                              bootstrap_resamples=0)
    assert "arena_scores" not in report["files"] and not (tmp_path / ARENA_SCORES).exists()
    assert "'clip 2.wav'" in caplog.text and ARENA_SCORES in caplog.text
    assert "antideepfake_scores" in report["files"]  # the other files are still written
