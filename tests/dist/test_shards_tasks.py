"""A shard build split into 3 independent tasks (one killed mid-way, then re-run) equals a 1-task build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.data.protocol import read_protocols
from posttrain.data.shard_build import build_shards, merge
from posttrain.data.shard_plan import BuildOptions, ShardBuildError, plan_shards, task_shards
from posttrain.data.shards import file_sha256, load_index

pytestmark = [pytest.mark.dist, pytest.mark.slow]

OPTIONS = {"max_samples_per_shard": 2, "seed": 3, "split": "train"}


def _build_cli(corpus, out: Path, *extra: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "shards", "build", "--protocol", str(corpus.protocol),
            "--root", str(corpus.root), "--out", str(out), "--max-samples-per-shard", "2", "--seed", "3",
            "--split", "train", "--no-progress", *extra]


def _kill_after_first_shard(command: list[str], records: list[Path], env: dict) -> None:
    """Start a build task and SIGKILL it as soon as it has finished one of its shards."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(record.exists() for record in records):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the task never finished a shard"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def test_three_tasks_with_a_killed_one_equal_one_task(make_corpus, tmp_path):
    corpus = make_corpus(num_files=36, seconds=(1.5, 2.5), bad=("nan", "short"))
    reference = build_shards([corpus.protocol], corpus.root, tmp_path / "one", progress=False, **OPTIONS)

    split = tmp_path / "three"
    specs = plan_shards(read_protocols([corpus.protocol]), BuildOptions(**OPTIONS))
    task1 = task_shards(specs, 1, 3)
    assert len(specs) == 19 and len(task1) == 6
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}  # task 1 via SLURM env
    _kill_after_first_shard(_build_cli(corpus, split), [split / ".records" / f"{s.name}.json" for s in task1], env)

    # The killed task left no half-written shard where training reads, and no partial index.
    assert not (split / "index.task-00001-of-00003.json").exists() and not (split / "index.json").exists()
    finished = {path.name for path in split.glob("*.tar")}
    assert finished and finished <= {spec.name for spec in task1}
    for name in finished:
        assert (split / ".records" / f"{name}.json").is_file()
        assert file_sha256(split / name) == next(s for s in reference["shards"] if s["name"] == name)["sha256"]
    before = {name: (split / name).stat().st_mtime_ns for name in finished}

    subprocess.run(_build_cli(corpus, split, "--task-index", "0", "--num-tasks", "3", "--workers", "2"), check=True)
    build_shards([corpus.protocol], corpus.root, split, task_index=2, num_tasks=3, progress=False, **OPTIONS)
    with pytest.raises(ShardBuildError, match=r"task\(s\) \[1\] of 3"):
        merge(split)

    subprocess.run(_build_cli(corpus, split), env=env, check=True)  # the re-run resumes task 1
    assert {name: (split / name).stat().st_mtime_ns for name in finished} == before  # skipped, not rebuilt
    subprocess.run([sys.executable, "-m", "posttrain.cli", "shards", "merge", str(split)], check=True,
                   stdout=subprocess.DEVNULL)

    index = load_index(split)
    assert [(s["name"], s["sha256"]) for s in index["shards"]] == [(s["name"], s["sha256"]) for s in reference["shards"]]
    for shard in index["shards"]:
        assert file_sha256(split / shard["name"]) == file_sha256(tmp_path / "one" / shard["name"])
    for name in ("index.json", "rejects.jsonl"):
        assert (split / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert index["rejects"] == 2 and index["totals"]["samples"] == 36
    assert not (split / ".staging").exists()
