"""One metrics table (``posttrain.eval.metrics.METRICS``): the metrics computed, the report table's columns
and the model card's columns all come from it, with the values each metric's own function gives."""

from __future__ import annotations

import numpy as np
import pytest

from posttrain.eval import metrics as m
from posttrain.eval.report import ScoreTable, evaluate, format_table
from posttrain.hub.card import TestResult as CardResult
from posttrain.hub.card import _evaluation


def _scores():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1.0, 1.0, 40), rng.normal(-1.0, 1.0, 60)])
    labels = np.array([1] * 40 + [0] * 60)
    return scores, labels


def test_every_metric_of_the_table_is_computed_by_its_own_function():
    scores, labels = _scores()
    result = m.compute_metrics(scores, labels)
    bona, spoof = scores[labels == 1], scores[labels == 0]
    assert (result["eer"], result["eer_threshold"]) == m.eer(bona, spoof)
    assert (result["min_dcf"], result["min_dcf_threshold"]) == m.min_dcf(bona, spoof)
    assert result["act_dcf"] == m.act_dcf(bona, spoof) and result["cllr"] == m.cllr(bona, spoof)
    assert result["auc"] == pytest.approx(np.mean(bona[:, None] > spoof[None, :]) + 0.5 * np.mean(bona[:, None] == spoof[None, :]))
    only_bona = m.compute_metrics(bona, np.ones_like(bona, dtype=int))
    assert all(only_bona[key] is None for metric in m.METRICS for key in metric.keys)


def test_report_and_card_show_the_table_columns_with_its_formats():
    scores, labels = _scores()
    document = evaluate(ScoreTable.from_records([{"id": f"s{i}", "score": s, "label": int(y)}
                                                 for i, (s, y) in enumerate(zip(scores, labels))]))
    table = format_table(document).splitlines()
    header, pooled = table[1].split(), table[3].split()
    assert header == ["group", "n", "bona", "spoof", "EER%", "EER%", "CI", "minDCF", "actDCF", "Cllr", "AUC"]
    assert pooled[4] == f"{100 * document['pooled']['eer']:.2f}" and pooled[-1] == f"{document['pooled']['auc']:.4f}"
    card = _evaluation([CardResult("set", "x", {"metrics": document["pooled"], "counts": {"trials": 100}})])
    assert "| test set | trials | " + " | ".join(metric.column for metric in m.METRICS) + " |" in card
    assert f"| {100 * document['pooled']['eer']:.2f} |" in card


def test_the_card_names_a_test_set_by_its_data_not_its_report_folder(tmp_path):
    import yaml

    from posttrain.eval.report import RESULT_FORMAT
    from posttrain.hub.card import read_result

    for data, expected in (({"kind": "shards", "directory": "/x/demo_data/shards/test"}, "demo_data/shards/test"),
                           ({"kind": "protocol", "protocol": "/data/itw/itw.csv"}, "itw.csv"),
                           ({"name": "In-the-Wild"}, "In-the-Wild"), ({}, "test")):
        path = tmp_path / "test" / "result.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({"format": RESULT_FORMAT, "data": data}))
        assert read_result(path).name == expected
