"""``python -m posttrain eval`` and ``python -m posttrain score`` run as a user would."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from posttrain.eval.calibration import Calibration, save_calibration

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


@pytest.mark.slow
def test_eval_writes_the_full_report(tiny_export_dir, shard_dir, tmp_path):
    out = tmp_path / "report"
    done = _run("eval", "--model", tiny_export_dir, "--shards", shard_dir, "--out", out, "--by", "corpus",
                "language", "--bootstrap", "20", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("scores.csv", "metrics.json", "metrics.txt", "det.png", "histograms.png", "result.yaml"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    index = json.loads((shard_dir / "index.json").read_text())
    assert len(rows) == index["totals"]["samples"] and {row["ScoreType"] for row in rows} == {"logit_diff"}
    for row in rows:  # the score is the logit difference written beside it
        assert float(row["Score"]) == pytest.approx(float(row["LogitReal"]) - float(row["LogitFake"]), abs=1e-12)
    with open(out / "antideepfake_scores.csv", newline="") as handle:  # AntiDeepfake's format, same trials
        ad_rows = [(row["ID"], json.loads(row["Score"]), int(row["Label"])) for row in csv.DictReader(handle)]
    assert ad_rows == [(row["ID"], [float(row["LogitFake"]), float(row["LogitReal"])], int(row["Label"]))
                       for row in rows]
    result = yaml.safe_load((out / "result.yaml").read_text())
    assert result["data"]["index_sha256"] == hashlib.sha256((shard_dir / "index.json").read_bytes()).hexdigest()
    assert result["score_file"]["sha256"] == hashlib.sha256((out / "scores.csv").read_bytes()).hexdigest()
    assert result["model"]["loaded_from"]["format"] == "transformers" and result["model"]["preset"] == "tiny"
    assert result["counts"]["trials"] == len(rows) and result["skipped"]["count"] == 0
    assert result["data"]["inference"]["window_seconds"] == 13.0
    assert set(json.loads((out / "metrics.json").read_text())["groups"]) == {"corpus", "language"}


@pytest.mark.slow
def test_score_reports_a_corrupt_file_and_scores_the_rest(tiny_export_dir, tiny_corpus, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for row in tiny_corpus.rows[:3]:
        source = row.resolved_path(tiny_corpus.root)
        shutil.copy(source, inputs / source.name)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(inputs / tiny_corpus.rows[0].path.split("/")[-1]),
                    "-c:a", "aac", str(inputs / "phone.m4a")], check=True)
    (inputs / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    calibration = save_calibration(Calibration(slope=1.5, offset=-0.5, score_definition="real logit minus fake logit"),
                                   tmp_path / "calibration.json")
    done = _run("score", "--model", tiny_export_dir, inputs, "--calibration", calibration, "--json",
                tmp_path / "scores.json", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    errors = [line for line in lines if line.startswith("ERROR ")]
    assert len(errors) == 1 and "broken.wav: unreadable" in errors[0]
    scored = [line for line in lines if "P(real)" in line]
    assert len(scored) == 4 and any("phone.m4a" in line for line in scored)
    assert all("LLR" in line and ("-> real" in line or "-> fake" in line) for line in scored)
    assert lines[0].startswith("decision: calibrated")
    document = json.loads((tmp_path / "scores.json").read_text())
    assert len(document["results"]) == 4 and document["errors"][0]["reason"] == "unreadable"
    for result in document["results"]:
        assert result["llr"] == pytest.approx(1.5 * result["logit_diff"] - 0.5)
        assert result["decision"] == ("real" if result["logit_diff"] >= document["threshold_logit_diff"] else "fake")


def test_score_fails_only_when_nothing_scores(tiny_export_dir, tmp_path, capsys):
    from posttrain.cli import main

    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + bytes(range(200)))
    code = main(["score", "--model", str(tiny_export_dir), str(tmp_path / "empty.wav"), str(tmp_path / "junk.wav"),
                 "--no-progress"])
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR ")]
    assert code == 1 and len(errors) == 2
    assert "empty.wav: empty" in errors[0] and "junk.wav: unreadable" in errors[1]
    # a file that is not there is the user's to fix: exit 2 naming it, before the model is loaded
    code = main(["score", "--model", str(tiny_export_dir), str(tmp_path / "empty.wav"), str(tmp_path / "absent.flac"),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and "ERROR" not in captured.out
    assert f"{tmp_path / 'absent.flac'}: no such file" in captured.err
