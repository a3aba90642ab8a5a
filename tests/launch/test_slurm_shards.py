"""launch/slurm_shards.sh checks the build (CSVs, split selection, plan) before it submits anything."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from posttrain.data.protocol import write_protocol

REPO = Path(__file__).resolve().parents[2]
FAKE_SBATCH = """#!/bin/bash
echo "$@" >> "$FAKE_SBATCH_RECORD"
echo $((100 + $(wc -l < "$FAKE_SBATCH_RECORD")))
"""


def _run(tmp_path, *args):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "sbatch").write_text(FAKE_SBATCH)
    (fake_bin / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FAKE_SBATCH_RECORD": str(tmp_path / "sbatch.txt")}
    return subprocess.run(["bash", str(REPO / "launch" / "slurm_shards.sh"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_a_mixed_protocol_is_refused_before_sbatch(make_corpus, tmp_path):
    corpus = make_corpus(num_files=6)
    rows = [dataclasses.replace(row, proportion=("train", "test")[i % 2]) for i, row in enumerate(corpus.rows)]
    write_protocol(rows, tmp_path / "mixed.csv")
    out = tmp_path / "shards"
    refused = _run(tmp_path, out, 2, "--protocol", tmp_path / "mixed.csv", "--root", corpus.root)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "rows of several proportions (train 3, test 3)" in refused.stderr
    assert not (tmp_path / "sbatch.txt").exists() and not out.exists()  # nothing submitted, nothing written

    done = _run(tmp_path, out, 2, "--protocol", tmp_path / "mixed.csv", "--root", corpus.root, "--split", "train")
    assert done.returncode == 0, done.stderr
    assert "check: 3 rows, split train" in done.stdout
    submitted = (tmp_path / "sbatch.txt").read_text().splitlines()
    assert len(submitted) == 2 and "--split train" in submitted[0] and "--array=0-1" in submitted[0]
    assert "afterok:101" in submitted[1]
