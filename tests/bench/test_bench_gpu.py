"""``python -m posttrain.bench gpu``: it refuses cleanly without CUDA, and its machinery runs end to end
on the CPU with the tiny preset (a dry run: the same child process, step modes, planner, RawBoost and
loader code as on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "posttrain.bench", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_refuses_without_cuda_with_a_one_line_hint():
    done = _bench()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench gpu: no CUDA device is visible; run it on a GPU machine, or pass `--device cpu --presets tiny` "
        "for a dry run of the machinery"]


@pytest.mark.slow
def test_dry_run_on_cpu_prints_the_table_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = _bench("--device", "cpu", "--presets", "tiny", "--steps", "1", "--warmup", "1", "--rawboost-clips", "4",
                  "--loader-files", "4", "--loader-seconds", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny" in done.stdout and "RawBoost algo 5" in done.stdout and "loader feed rate" in done.stdout
    result = json.loads(out.read_text())
    (row,) = result["presets"]
    assert row["preset"] == "tiny" and row["stage"] == 2 and row["attention"] == "sdpa"
    assert row["clips"] == 1 and row["audio_seconds"] == 4.0  # the tiny budget: one 4 s clip
    assert row["plain_step_s"] > 0 and row["sam_step_s"] > 0 and 0 < row["mfu"] < 1
    assert row["overlap_comm"] is False and row["fused_adamw"] is False  # CPU: no streams, unfused AdamW
    assert row["planned_bytes"] > 0 and row["peak_allocated_bytes"] > 0
    assert result["rawboost_clips_per_s"] > 0 and result["loader_audio_per_s"] > 0
