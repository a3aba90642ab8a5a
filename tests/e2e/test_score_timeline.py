"""`posttrain score --timeline`: every window's score (calibrated), the regions called fake, a PNG;
the file score is unchanged and is the aggregate of the very windows the timeline lists."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.eval.calibration import Calibration, save_calibration
from posttrain.eval.scoring import Decision

RATE = 16000


def _reference_window_scores(model, wave: np.ndarray, spans) -> np.ndarray:
    """Each window alone, normalised on its own (zero mean, unit variance), no batching: logit_diff."""
    scores = []
    for start, stop in spans:
        x = torch.from_numpy(wave[start:stop].astype(np.float64))
        x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)).float()[None]
        with torch.no_grad():
            logits = model(x, torch.tensor([x.shape[1]])).double().numpy()[0]
        scores.append(logits[1] - logits[0])
    return np.array(scores)


def test_timeline_lists_every_window_calibrated_with_fake_regions(tiny_export_dir, tmp_path, capsys):
    from posttrain.cli import main
    from posttrain.loading import load_model

    rng = np.random.default_rng(3)
    t = np.arange(int(5.5 * RATE)) / RATE
    wave = (0.2 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(0.9 * t)) + 0.05 * rng.standard_normal(t.size))
    wave[2 * RATE:3 * RATE] = 0.3 * rng.standard_normal(RATE)  # a different second in the middle
    wave = wave.astype(np.float32)
    sf.write(tmp_path / "talk.wav", wave, RATE, subtype="FLOAT")
    # window 2 s, hop 1 s over 5.5 s: windows start every second until one reaches the end (4..5.5)
    spans = [(0, 2 * RATE), (RATE, 3 * RATE), (2 * RATE, 4 * RATE), (3 * RATE, 5 * RATE), (4 * RATE, t.size)]
    model, _ = load_model(tiny_export_dir)
    reference = _reference_window_scores(model, wave, spans)
    # a calibration whose decision threshold falls between the window scores, so both decisions occur
    slope = 2.0
    plain = Decision.of(Calibration(slope, 0.0, 0.5, "logit_diff", {}))
    median = float(np.median(reference))
    calibration = Calibration(slope, slope * (plain.threshold - median), 0.5, "logit_diff", {})
    save_calibration(calibration, tmp_path / "calibration.json")
    threshold = Decision.of(calibration).threshold
    assert threshold == pytest.approx(median)

    code = main(["score", "--model", str(tiny_export_dir), str(tmp_path / "talk.wav"), "--no-progress",
                 "--window-seconds", "2", "--hop-seconds", "1", "--calibration", str(tmp_path / "calibration.json"),
                 "--timeline", str(tmp_path / "tl"), "--json", str(tmp_path / "scores.json")])
    assert code == 0, capsys.readouterr()
    with open(tmp_path / "tl" / "talk.wav.timeline.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["start_s"]), float(r["end_s"])) for r in rows] == [(a / RATE, b / RATE) for a, b in spans]
    scores = np.array([float(r["logit_diff"]) for r in rows])
    np.testing.assert_allclose(scores, reference, atol=1e-4)
    np.testing.assert_allclose([float(r["llr"]) for r in rows], slope * scores + calibration.offset, atol=1e-9)
    expected = ["real" if s >= threshold else "fake" for s in scores]
    assert [r["decision"] for r in rows] == expected and {"real", "fake"} <= set(expected)

    document = json.loads((tmp_path / "tl" / "talk.wav.timeline.json").read_text())
    covered = np.zeros(t.size, bool)  # fake regions = the union of the fake windows, independently
    for (start, stop), decision in zip(spans, expected):
        covered[start:stop] |= decision == "fake"
    edges = np.flatnonzero(np.diff(np.concatenate([[0], covered.astype(int), [0]])))
    assert document["fake_regions"] == [[a / RATE, b / RATE] for a, b in zip(edges[::2], edges[1::2])]
    assert document["threshold_logit_diff"] == pytest.approx(threshold)
    png = (tmp_path / "tl" / "talk.wav.timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the file score is the length-weighted mean of the windows listed (mean_logits), as before
    result = json.loads((tmp_path / "scores.json").read_text())["results"][0]
    lengths = np.array([b - a for a, b in spans], float)
    assert result["logit_diff"] == pytest.approx(float(lengths @ scores / lengths.sum()), abs=1e-4)
    assert result["timeline"]["csv"].endswith("talk.wav.timeline.csv")


def test_timeline_names_are_unique_when_file_names_collide():
    from posttrain.commands.score import timeline_stems

    assert timeline_stems(["a/x.wav", "b/x.wav", "c/y.wav"]) == ["0000-x.wav", "0001-x.wav", "y.wav"]
