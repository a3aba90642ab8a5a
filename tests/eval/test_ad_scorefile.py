"""AntiDeepfake's score file: posttrain writes it byte for byte as AD's main.py does, and ``posttrain metrics``
on it gives the EER AntiDeepfake's own evaluation.py computes (tests/fixtures/ad_evaluation, made by running
AD's evaluation.py at 0dea622 on these files; see its README)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from posttrain.eval.ad_scorefile import ANTIDEEPFAKE_SCORES, antideepfake_text
from posttrain.eval.report import ScoreTable, read_scores, write_report

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ad_evaluation"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CASES = sorted(EXPECTED["cases"])


def _records(case):
    return json.loads((FIXTURES / f"{case}_records.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_eval_report_writes_ads_score_file_byte_identical_to_the_fixture(case, tmp_path):
    report = write_report(tmp_path, _records(case), score_definition="s", model_identity={}, data_identity={},
                          bootstrap_resamples=0)
    written = tmp_path / ANTIDEEPFAKE_SCORES
    assert written.read_bytes() == (FIXTURES / EXPECTED["cases"][case]["score_file"]).read_bytes()
    assert report["files"]["antideepfake_scores"] == written
    assert yaml.safe_load((tmp_path / "result.yaml").read_text())["files"]["antideepfake_scores"] == ANTIDEEPFAKE_SCORES


@pytest.mark.parametrize("case", CASES)
def test_posttrain_metrics_gives_antideepfakes_eer(case, tmp_path):
    from posttrain.cli import main

    expected = EXPECTED["cases"][case]
    score_file = FIXTURES / expected["score_file"]
    assert main(["metrics", str(score_file), "--bootstrap", "0", "--by", "corpus", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ad = {**expected["pooled"]["full_precision"], **expected.get("subsets", {}).get("full_precision", {})}
    printed = {**expected["pooled"]["printed"], **expected.get("subsets", {}).get("printed", {})}
    ours = {"Pooled": metrics["pooled"], **metrics["groups"]["corpus"]}
    assert set(ad) <= set(ours)
    for subset, values in ad.items():
        # the same ASVspoof EER: bit for bit at full precision, and as AD prints it (4 decimals of the fraction)
        assert ours[subset]["eer"] == values["eer"], subset
        assert round(ours[subset]["eer"], 4) == printed[subset]["eer"], subset
        assert "{:8.9f} %".format(ours[subset]["eer"] * 100) == values["eer_logged"], subset
        assert (ours[subset]["n_bona_fide"], ours[subset]["n_spoof"]) == (values["n_bona_fide"], values["n_spoof"])


def test_the_file_reads_back_to_the_same_logits():
    records = _records("logits")
    table = read_scores(FIXTURES / EXPECTED["cases"]["logits"]["score_file"])
    assert table.source_format == "antideepfake" and table.ids == [r["id"] for r in records]
    assert table.logits.tolist() == [[r["logit_fake"], r["logit_real"]] for r in records]
    assert table.labels.tolist() == [r["label"] for r in records]


def test_a_cosine_is_written_as_ads_one_class_pair_and_a_lone_score_not_at_all():
    cosine = ScoreTable.from_records([{"id": "OC-a", "score": 0.25, "label": 1, "score_type": "cosine"},
                                      {"id": "OC-b", "score": -0.5, "label": "fake", "score_type": "cosine"}])
    assert antideepfake_text(cosine) == 'ID,Score,Label\nOC-a,"[-0.25, 0.25]",1\nOC-b,"[0.5, -0.5]",0\n'
    lone = ScoreTable.from_records([{"id": "X-a", "score": 1.5, "label": 1, "score_type": "logit_diff"}])
    assert antideepfake_text(lone) is None  # a logit difference alone is no [fake, real] pair: never invented


def test_no_ad_file_for_scores_without_pairs(tmp_path):
    records = [{"id": f"X-{i}", "score": float(s), "label": i % 2} for i, s in enumerate(np.linspace(-1, 1, 6))]
    report = write_report(tmp_path, records, score_definition="s", model_identity={}, data_identity={},
                          bootstrap_resamples=0)
    assert "antideepfake_scores" not in report["files"] and not (tmp_path / ANTIDEEPFAKE_SCORES).exists()
