"""``posttrain export --format onnx --quantize int8 --int8-check NAME=DATA``: the int8 model's EER, fp32's and the
Pearson r of their scores on labelled sets, in ``posttrain.json`` and on the card. The fp32 EER is ``posttrain
eval --backend onnxruntime``'s, r is numpy's correlation of the score files ``eval`` writes with both graphs;
int8 scores are never compared exactly (onnxruntime's int8 kernels differ by instruction set)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from posttrain.cli import main


@pytest.fixture(scope="module")
def checked_dir(tiny_export_dir, tiny_corpus, shard_dir, tmp_path_factory) -> Path:
    """The tiny export as ONNX with int8, checked on the tiny corpus as a protocol (``CSV:ROOT``) and as shards."""
    out = tmp_path_factory.mktemp("onnx_int8_check") / "tiny_onnx"
    assert main(["export", str(tiny_export_dir), "--format", "onnx", "--out", str(out), "--quantize", "int8",
                 "--int8-check", f"corpus={tiny_corpus.protocol}:{tiny_corpus.root}",
                 "--int8-check", f"shards={shard_dir}"]) == 0
    return out


def test_int8_check_fp32_eer_is_evals_and_r_is_the_score_files_correlation(checked_dir, tiny_corpus, tmp_path):
    def eval_report(row: dict, backend: str) -> tuple[dict, dict[str, float]]:
        out = tmp_path / f"{row['name']}_{backend}"
        data = ["--protocol", row["data"], "--root", row["root"]] if row["root"] else ["--shards", row["data"]]
        assert main(["eval", "--model", str(checked_dir), *data, "--out", str(out), "--no-mlflow", "--no-progress",
                     "--backend", backend, "--max-batch-size", "1"]) == 0
        with open(out / "scores.csv", newline="") as table:
            scores = {line["ID"]: float(line["Score"]) for line in csv.DictReader(table)}
        return json.loads((out / "metrics.json").read_text())["pooled"], scores

    check = json.loads((checked_dir / "posttrain.json").read_text())["onnx"]["int8_check"]
    for row in check["sets"]:  # each as eval reads it
        (pooled, fp32), (_, int8) = eval_report(row, "onnxruntime"), eval_report(row, "onnxruntime-int8")
        assert row["fp32"]["eer"] == pooled["eer"] and row["fp32"]["eer_ci"] == pooled["eer_ci"]
        assert row["trials"] == len(fp32) == len(tiny_corpus.good_rows)
        ids = sorted(fp32)
        reference = np.corrcoef([fp32[key] for key in ids], [int8[key] for key in ids])[0, 1]
        assert row["pearson_r"] == pytest.approx(reference, abs=1e-9)


def test_int8_check_table_is_on_the_card_and_in_posttrain_json(checked_dir):
    from posttrain.eval.int8_check import CPU_FLAGS, cpu_text, eer_text, r_text, summary_line

    check = json.loads((checked_dir / "posttrain.json").read_text())["onnx"]["int8_check"]
    assert [row["name"] for row in check["sets"]] == ["corpus", "shards"]
    assert set(check["cpu"]["flags"]) == set(CPU_FLAGS) and check["bootstrap"] == {"resamples": 1000, "seed": 0}
    card = (checked_dir / "README.md").read_text()
    assert "## int8 quality on labelled sets" in card and cpu_text(check["cpu"]) in card
    for row in check["sets"]:
        assert row["passed"] == (row["int8_eer_in_fp32_ci"] and row["pearson_meets_goal"])
        line = next(line for line in card.splitlines() if line.startswith(f"| {row['name']} |"))
        cells = f"| {row['trials']} | {eer_text(row['fp32'])} | {eer_text(row['int8'])} | {r_text(row['pearson_r'])} |"
        assert cells in line, line
    missed = {**check["sets"][0], "pearson_r": 0.99, "pearson_meets_goal": False}
    assert summary_line(missed).endswith("Pearson r 0.990000 -- MISSED: r below 0.999")


def test_int8_check_options_are_refused_in_one_line(tiny_export_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "onnx"

    def refused(*options: str) -> str:
        argv = ["export", str(tiny_export_dir), "--format", "onnx", "--out", str(out), *options]
        try:
            code = main(argv)
        except SystemExit as usage:  # argparse: a bad option value
            code = usage.code
        err = capsys.readouterr().err
        assert code == 2 and not out.exists(), err
        (line,) = [line for line in err.splitlines() if line.startswith("posttrain export: error: ")]
        assert "--int8-check" in line, line
        return line

    assert "add --quantize int8" in refused("--int8-check", f"s={tiny_corpus.protocol}:{tiny_corpus.root}")
    assert "expected NAME=DATA" in refused("--quantize", "int8", "--int8-check", str(tiny_corpus.protocol))
    assert "no such shard folder or protocol CSV" in refused("--quantize", "int8", "--int8-check",
                                                             f"s={tmp_path / 'nowhere'}")
    assert f"s={tiny_corpus.protocol}:ROOT" in refused("--quantize", "int8", "--int8-check",
                                                       f"s={tiny_corpus.protocol}")
    given = f"s={tiny_corpus.protocol}:{tiny_corpus.root}"
    assert "given twice" in refused("--quantize", "int8", "--int8-check", given, "--int8-check", given)


def test_a_failed_int8_check_leaves_no_folder(checked_dir, tiny_export_dir, tiny_corpus, tmp_path, monkeypatch,
                                              capsys):
    import shutil

    from posttrain.data.protocol import write_protocol
    from posttrain.hub import onnx_int8_check

    # the graph export is onnx_export's (tested there): a copy of a finished one stands in for it here
    monkeypatch.setattr(onnx_int8_check, "export_onnx", lambda detector, out, *args, **options: Path(
        shutil.copytree(checked_dir, out)))
    real = tmp_path / "real.csv"  # one class: no EER, so the check fails after the export is written
    write_protocol([row for row in tiny_corpus.good_rows if row.label == "real"], real)
    out = tmp_path / "exports" / "onnx"
    assert main(["export", str(tiny_export_dir), "--format", "onnx", "--out", str(out), "--quantize", "int8",
                 "--int8-check", f"real={real}:{tiny_corpus.root}"]) == 2
    assert "--int8-check real=" in capsys.readouterr().err
    assert not list((tmp_path / "exports").iterdir())  # neither the export nor its staging folder
