"""`posttrain score` writes the score file `posttrain metrics` reads, and flags near-silent input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf

from posttrain.data.protocol import ProtocolRow, write_protocol
from posttrain.eval.report import read_scores


def _write(path, samples):
    sf.write(path, samples.astype(np.float32), 16000, subtype="FLOAT")  # FLOAT: the level survives exactly
    return path


def test_score_file_reads_back_in_metrics_and_near_silent_input_is_flagged(tiny_export_dir, tmp_path, capsys):
    from posttrain.cli import main

    rng = np.random.default_rng(0)
    t = np.arange(24000) / 16000
    waves = {"speechlike": 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size),
             "loud_noise": 0.1 * rng.standard_normal(t.size),
             "hiss": 1e-4 * rng.standard_normal(t.size),  # about -80 dBFS
             "digital_silence": np.zeros(t.size)}
    files = {name: _write(tmp_path / f"{name}.wav", wave) for name, wave in waves.items()}
    labels = {"speechlike": "real", "loud_noise": "fake", "hiss": "real", "digital_silence": "fake"}
    write_protocol([ProtocolRow(id=f"T-{name}", label=labels[name], duration_s=1.5, path=f"$ROOT/{name}.wav")
                    for name in waves], tmp_path / "labels.csv")

    argv = ["score", "--model", str(tiny_export_dir), *map(str, files.values()), "--no-progress"]
    assert main(argv + ["--scores-out", str(tmp_path / "s.csv")]) == 2  # no labels: refused before scoring
    assert "--scores-out needs --labels" in capsys.readouterr().err
    code = main(argv + ["--labels", str(tmp_path / "labels.csv"), "--root", str(tmp_path),
                        "--scores-out", str(tmp_path / "scores.csv"), "--json", str(tmp_path / "scores.json")])
    out = capsys.readouterr().out
    assert code == 0
    warned = [line for line in out.splitlines() if line.startswith("WARNING ")]
    assert [line.split()[1].rstrip(":") for line in warned] == [str(files["hiss"]), str(files["digital_silence"])]
    assert "2 near-silent" in out
    results = {row["file"]: row for row in json.loads((tmp_path / "scores.json").read_text())["results"]}
    for name, wave in waves.items():
        row = results[str(files[name])]
        rms = math.sqrt(float(np.mean(np.square(wave.astype(np.float32).astype(np.float64)))))
        assert row["level_dbfs"] == pytest.approx(20 * math.log10(max(rms, 1e-10)), abs=1e-3)
        assert row["near_silent"] == (name in ("hiss", "digital_silence"))

    table = read_scores(tmp_path / "scores.csv")  # the one score-file format, as `eval` writes it
    assert table.source_format == "posttrain" and sorted(table.ids) == sorted(f"T-{name}" for name in waves)
    for sample_id, score, label in zip(table.ids, table.scores, table.labels):
        name = sample_id[2:]
        assert score == results[str(files[name])]["logit_diff"]
        assert label == (1 if labels[name] == "real" else 0)
    assert main(["metrics", str(tmp_path / "scores.csv"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "metrics.json").is_file()
