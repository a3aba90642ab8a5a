"""``posttrain data partialspoof`` then ``posttrain eval --segments``, run as a user would."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from posttrain.data.partialspoof import read_segments

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


@pytest.mark.slow
def test_eval_reports_segment_eer_per_resolution_and_localisation(tiny_export_dir, tiny_corpus, tmp_path):
    data = tmp_path / "partial"
    built = _run("data", "partialspoof", "--protocol", tiny_corpus.protocol, "--root", tiny_corpus.root, "--out", data,
                 "--files", "6", "--clips-per-file", "3", "--seed", "1", "--no-progress", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    segments_csv = data / "partialspoof.segments.csv"
    common = ("eval", "--model", tiny_export_dir, "--protocol", data / "partialspoof.csv", "--root", data,
              "--segments", segments_csv, "--no-progress")
    # whole-file scores have no timeline to cut into segments: refused before any scoring, in one line
    refused = _run(*common, "--out", tmp_path / "refused", cwd=tmp_path)
    assert refused.returncode == 2 and "--hop-seconds 13 is coarser" in refused.stderr
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "report"
    done = _run(*common, "--window-seconds", "0.3", "--hop-seconds", "0.1", "--min-tail-seconds", "0.1",
                "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "segment=160ms" in done.stdout and "localisation (160 ms segments" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())  # reloaded report files
    truth = read_segments(segments_csv)
    for name, resolution in (("160ms", 2560), ("320ms", 5120), ("640ms", 10240)):
        row = metrics["groups"]["segment"][name]
        # every segment of every file is one trial; fake ones are those overlapping a fake clip
        assert row["n"] == sum(math.ceil(segments[-1].stop / resolution) for segments in truth.values())
        fake = sum(sum(any(s.label == "fake" and s.start < start + resolution and start < s.stop for s in segments)
                       for start in range(0, segments[-1].stop, resolution)) for segments in truth.values())
        assert row["n_spoof"] == fake and 0.0 <= row["eer"] <= 1.0
    assert set(metrics["groups"]["segment"]) == {"160ms", "320ms", "640ms"}
    localisation = metrics["segments"]["localisation"]
    assert localisation["files_with_spoof"] == 4 and localisation["real_files"] == 2
    assert set(localisation["by_attack"]) == {"-", "partial-fakehost", "partial-realhost"}
    result = yaml.safe_load((out / "result.yaml").read_text())
    assert result["segments"]["eer"] == {name: m["eer"] for name, m in metrics["groups"]["segment"].items()}
