"""Score-file readers and writers, and the report files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from posttrain.eval.calibration import Calibration
from posttrain.eval.metrics import compute_metrics
from posttrain.eval.report import ScoreFileError, ScoreTable, read_scores, write_report, write_scores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_table(seed=0, n=60, with_logits=True):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    logits_real = rng.normal(np.where(labels == 1, 1.0, -1.0), 1.0)
    logits_fake = rng.normal(0.0, 0.5, n)
    records = []
    for i in range(n):
        record = {"id": f"{'CA' if i % 3 else 'CB'}-utt{i:03d}", "score": logits_real[i] - logits_fake[i],
                  "label": int(labels[i]), "attack": "-" if labels[i] else f"A0{i % 4}",
                  "language": "en" if i % 4 else "de", "score_type": "logit_diff"}
        if with_logits:
            record.update(logit_fake=logits_fake[i], logit_real=logits_real[i])
        records.append(record)
    return ScoreTable.from_records(records)


# ----------------------------------------------------------------------------- formats


def test_posttrain_score_file_round_trips_exactly(tmp_path):
    table = make_table()
    path = tmp_path / "scores.csv"
    sha256 = write_scores(path, table)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.read_text().splitlines()[0] == "ID,Score,Label,Attack,Language,Corpus,ScoreType,LogitFake,LogitReal"
    loaded = read_scores(path)
    assert loaded.source_format == "posttrain"
    assert loaded.ids == table.ids
    assert np.array_equal(loaded.scores, table.scores)
    assert np.array_equal(loaded.logits, table.logits)
    assert np.array_equal(loaded.labels, table.labels)
    assert loaded.corpora == table.corpora == [i.split("-")[0] for i in table.ids]
    assert loaded.attacks == table.attacks and loaded.languages == table.languages


def test_posttrain_score_file_without_logits(tmp_path):
    table = make_table(with_logits=False)
    write_scores(tmp_path / "s.csv", table)
    loaded = read_scores(tmp_path / "s.csv")
    assert loaded.logits is None and np.array_equal(loaded.scores, table.scores)


ANTIDEEPFAKE = """ID,Score,Label
ITW-a1,"[-3.75, 3.77]",1
ITW-a2,"[3.43, -3.55]",0
FOR-b1,"[-1.0, 2.5]",1
"""


def test_antideepfake_logit_lists(tmp_path):
    path = tmp_path / "score.csv"
    path.write_text(ANTIDEEPFAKE)
    table = read_scores(path)
    assert table.source_format == "antideepfake"
    assert table.scores.tolist() == [3.77 - -3.75, -3.55 - 3.43, 2.5 - -1.0]
    assert table.logits.tolist() == [[-3.75, 3.77], [3.43, -3.55], [-1.0, 2.5]]
    assert table.labels.tolist() == [1, 0, 1]
    assert table.corpora == ["ITW", "ITW", "FOR"]
    assert table.score_types_present == ["logit_diff"]
    assert table.score_definition == "real logit minus fake logit"
    real_only = read_scores(path, logit_score="real_logit")
    assert real_only.scores.tolist() == [3.77, -3.55, 2.5]
    assert real_only.score_types_present == ["real_logit"]


def test_plain_file_with_mixed_label_spellings(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("id,score,label\nx-1,0.9,bonafide\nx-2,-0.2,spoof\ny-3,0.4,Real\ny-4,0.1,FAKE\nz-5,2,1\nz-6,-2,0\n")
    table = read_scores(path)
    assert table.source_format == "plain"
    assert table.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert table.scores.tolist() == [0.9, -0.2, 0.4, 0.1, 2.0, -2.0]
    assert table.score_types_present == ["score"]


@pytest.mark.parametrize("content,line,message", [
    ("id,score,label\na-1,0.5,real\na-2,0.1,maybe\n", 3, "unknown label"),
    ("id,score,label\na-1,0.5,real\na-2,abc,fake\n", 3, "bad score"),
    ("id,score,label\na-1,0.5,real\n\na-2,0.1,fake,extra\n", 4, "4 fields"),
    ("id,score,label\na-1,0.5,real\na-1,0.1,fake\n", 3, "duplicate ID"),
    ('ID,Score,Label\na-1,"[1.0, 2.0, 3.0]",1\n', 2, "expected 2 logits"),
    ('ID,Score,Label\na-1,"[1.0, 2.0]",1\na-2,0.5,0\n', 3, "mixes"),
    ("id,score,label\na-1,nan,real\n", 2, "finite"),
    ("ID,Score,Label,ScoreType\na-1,0.5,1,\n", 2, "empty ScoreType"),
    ("identifier,value\na,1\n", 1, "unknown header"),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ScoreFileError, match=message) as error:
        read_scores(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert error.value.line == line


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ScoreFileError, match="not found"):
        read_scores(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("ID,Score,Label\n")
    with pytest.raises(ScoreFileError, match="no score rows"):
        read_scores(tmp_path / "empty.csv")


# ----------------------------------------------------------------------------- report


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # something was drawn


def result_files(out):
    files = yaml.safe_load((out / "result.yaml").read_text())["files"]
    return {**files, "result": "result.yaml"}


def test_write_report_from_records(tmp_path):
    table = make_table(n=90)
    records = [{"id": table.ids[i], "score": table.scores[i], "label": int(table.labels[i]),
                "attack": table.attacks[i], "language": table.languages[i], "score_type": "logit_diff"}
               for i in range(len(table))]
    skipped = [{"id": "CA-broken", "reason": "cannot decode audio"}]
    report = write_report(tmp_path / "out", records, score_definition="real logit minus fake logit",
                          model_identity={"name": "tiny", "sha256": "abc"}, data_identity={"shards": "demo"},
                          skipped=skipped, group_by=["corpus", "attack", "language"], bootstrap_resamples=50)
    out = tmp_path / "out"
    # every file was renamed into place: no temporary names left behind
    assert sorted(p.name for p in out.iterdir()) == ["arena_scores.txt", "det.png", "histograms.png", "metrics.json", "metrics.txt",
                                                     "rejects.jsonl", "result.yaml", "scores.csv"]
    assert [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()] == skipped
    assert {role: path.name for role, path in report["files"].items()} == result_files(out)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = compute_metrics(table.scores, table.labels, bootstrap_resamples=50)
    assert metrics["pooled"]["eer"] == expected["eer"] and metrics["pooled"]["eer_ci"] == expected["eer_ci"]
    assert set(metrics["groups"]) == {"corpus", "attack", "language"}
    assert set(metrics["groups"]["attack"]) == {"A00", "A02"}  # even ids are bona fide: only A00/A02 on spoofs
    assert metrics["groups"]["attack"]["A00"]["n_bona_fide"] == 45
    table_text = (out / "metrics.txt").read_text()
    assert table_text == report["table"]
    assert "corpus=CB" in table_text and f"{expected['eer'] * 100:.2f}" in table_text
    assert_png(out / "det.png")
    assert_png(out / "histograms.png")

    result = yaml.safe_load((out / "result.yaml").read_text())
    score_file = out / "scores.csv"
    assert result["score_file"]["sha256"] == hashlib.sha256(score_file.read_bytes()).hexdigest()
    assert result["score_file"]["sha256"] == report["score_file_sha256"]
    assert result["counts"] == {"trials": 90, "bona_fide": 45, "spoof": 45,
                                "groups": result["counts"]["groups"]}
    assert result["counts"]["groups"]["corpus"]["CB"] == {"bona_fide": 15, "spoof": 15}
    assert result["skipped"] == {"count": 1, "items": skipped}
    assert result["model"] == {"name": "tiny", "sha256": "abc"} and result["data"] == {"shards": "demo"}
    assert result["score_definition"] == "real logit minus fake logit"
    assert result["metrics"]["eer"] == expected["eer"]
    reread = read_scores(score_file)
    assert np.array_equal(reread.scores, table.scores)


def test_report_with_calibration_and_a_single_class_group(tmp_path):
    table = make_table(n=40, with_logits=False)
    table.corpora = ["ONLYREAL" if label == 1 and i < 10 else "MIX" for i, label in enumerate(table.labels)]
    calibration = Calibration(slope=0.8, offset=-0.1, score_definition="real logit minus fake logit")
    report = write_report(tmp_path, table, score_definition="real logit minus fake logit", model_identity={},
                          data_identity={}, group_by=["corpus"], calibration=calibration)
    metrics = report["metrics"]
    llr = 0.8 * table.scores - 0.1
    assert metrics["pooled"]["cllr"] == compute_metrics(table.scores, table.labels, llr)["cllr"]
    assert metrics["pooled"]["llr_source"] == "calibrated"
    assert metrics["calibration"]["slope"] == 0.8
    assert metrics["groups"]["corpus"]["ONLYREAL"]["eer"] is None
    assert "n/a in corpus=ONLYREAL: only bona fide" in report["table"]
    result = yaml.safe_load((tmp_path / "result.yaml").read_text())
    assert result["calibration"]["offset"] == -0.1 and result["metrics"]["llr_source"] == "calibrated"
