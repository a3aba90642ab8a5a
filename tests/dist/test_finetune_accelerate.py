"""``accelerate launch --num_processes 2 --use_deepspeed finetune.py`` on a synthetic Deepfake-Eval-2024
(CPU, gloo, ZeRO-2 from configs/accelerate/cpu_2proc.yaml), from a tiny transformers export.

The launched script registers a test-only step mode (``probe``) around the plain step: per rank it
records the global rank, the sample ids it trained on, and DeepSpeed's own step counter, then the
script runs ``finetune.py``'s ``main`` unchanged.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.data.shards import load_index
from posttrain.data.read_order import decode_positions
from posttrain.dist import free_port
from posttrain.loading import load_model
from posttrain.train.checkpoint import read_metadata, read_pointer

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

PROBE_SCRIPT = '''
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
from posttrain.train.step import plain_step, register_step_mode

@register_step_mode("probe")
def probe_step(engine, micro_batches, ctx):
    stats = plain_step(engine, micro_batches, ctx)
    record = {{"rank": dist.get_rank(), "world_size": dist.get_world_size(), "step": ctx.step + 1, "epoch": ctx.epoch,
              "ids": [i for b in micro_batches for i in b.ids], "engine_steps": engine.global_steps,
              "engine_type": type(engine).__name__}}
    with open(os.path.join({probe_dir!r}, f"rank{{dist.get_rank()}}.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\\n")
    return stats

import finetune
sys.exit(finetune.main())
'''


@pytest.fixture(scope="module")
def launched(tiny_df2024, tiny_export_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("finetune_accelerate")
    probe_dir = work / "probe"
    probe_dir.mkdir()
    script = work / "finetune_probe.py"
    script.write_text(PROBE_SCRIPT.format(repo=str(REPO), probe_dir=str(probe_dir)))
    train_shards = tiny_df2024 / "shards" / "2s" / "train_x3"
    out = work / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(script), "--config", str(REPO / "configs" / "finetune" / "df2024.yaml"),
               f"output_dir={out}", f"finetune.init_from={tiny_export_dir}", "finetune.init_preset=null",
               "model.preset=tiny", "model.gradient_checkpointing=false", f"finetune.df2024_dir={tiny_df2024}",
               "finetune.train_segment_seconds=2", "finetune.eval_segment_seconds=[2, 4]",
               f"data.train.shards=[{train_shards}]", "data.train.num_workers=0", "data.train.max_batch_seconds=4",
               "train.device=cpu", "train.precision=fp32", "train.max_epochs=2", "train.step_mode=probe",
               "optim.lr=0.001", "train.log_every_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=50",
               f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", "tracking.system_metrics=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    records = [json.loads(line) for path in sorted(probe_dir.glob("rank*.jsonl"))
               for line in path.read_text().splitlines()]
    return {"out": out, "work": work, "records": records, "train_shards": train_shards, "init": tiny_export_dir,
            "df2024": tiny_df2024}


def test_both_ranks_trained_distinct_shares_exactly_once_per_epoch(launched):
    records = launched["records"]
    index = load_index(launched["train_shards"])
    all_ids = sorted(key for shard in index["shards"] for key in shard["keys"])  # segment ids are already keys
    assert {r["rank"] for r in records} == {0, 1} and {r["world_size"] for r in records} == {2}
    for epoch in (0, 1):
        per_rank = {rank: [i for r in records if r["rank"] == rank and r["epoch"] == epoch for i in r["ids"]]
                    for rank in (0, 1)}
        assert per_rank[0] and per_rank[1], f"epoch {epoch}: a rank trained on nothing: {per_rank}"
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == all_ids  # every segment once, none twice
    # DeepSpeed stepped once per optimiser step: step modes call the engine's own backward/step
    assert all(r["engine_steps"] == r["step"] for r in records)
    assert {r["engine_type"] for r in records} == {"DeepSpeedEngine"}


def test_mid_epoch_checkpoint_accounts_exactly_what_was_trained(launched):
    records, root = launched["records"], launched["out"] / "checkpoints"
    metadata = read_metadata(root / "step-00000002")
    assert metadata["world_size"] == 2 and metadata["zero_stage"] == 2 and metadata["progress"]["step"] == 2
    index = load_index(launched["train_shards"])
    keys = {f"0:{i}:0": shard["keys"] for i, shard in enumerate(index["shards"])}
    consumed = sorted(keys[unit][p] for unit, encoded in metadata["loader"]["consumed"].items()
                      for p in decode_positions(encoded))
    trained = sorted(i for r in records if r["step"] <= 2 for i in r["ids"])
    assert consumed == trained and len(trained) == metadata["progress"]["samples"]


def test_checkpoint_loads_and_weights_moved_from_the_init(launched):
    root = launched["out"] / "checkpoints"
    final = read_metadata(root / read_pointer(root))
    steps = max(r["step"] for r in launched["records"])
    assert final["progress"]["step"] == steps and final["progress"]["epoch"] == 2
    trained, identity = load_model(root)
    init, _ = load_model(launched["init"])
    assert identity["loaded_from"]["format"] == "checkpoint" and identity["preset"] == "tiny"
    before, after = init.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert "head.weight" in moved and len(moved) > len(before) // 2
    # the fine-tune settings travel with the checkpoint (publish reads them from here)
    assert final["config"]["finetune"]["init_from"] == str(launched["init"])
    assert final["config"]["rawboost"]["enabled"] and final["config"]["optim"]["lr"] == 0.001


def _scores(path: Path) -> dict[str, tuple[float, int]]:
    with open(path, newline="") as handle:
        return {row["ID"]: (float(row["Score"]), int(row["Label"])) for row in csv.DictReader(handle)}


def test_reports_per_segment_length_and_per_file(launched):
    out, df2024 = launched["out"], launched["df2024"]
    for seconds in (2, 4):
        folder = out / "eval" / f"{seconds}s"
        segments, files = _scores(folder / "segments" / "scores.csv"), _scores(folder / "files" / "scores.csv")
        test_index = load_index(df2024 / "shards" / f"{seconds}s" / "test")
        assert sorted(segments) == sorted(meta_id for shard in test_index["shards"] for meta_id in shard["keys"])
        with open(df2024 / f"{seconds}s" / "segments.csv", newline="") as handle:
            mapping = [row for row in csv.DictReader(handle) if row["split"] == "test"]
        assert sorted(files) == sorted({row["file_id"] for row in mapping})
        # per file: the length-weighted mean of its segments' logit differences (mean_logits is linear)
        for file_id in files:
            rows = [row for row in mapping if row["file_id"] == file_id]
            weights = [int(row["end_sample"]) - int(row["start_sample"]) for row in rows]
            expected = sum(w * segments[row["segment_id"]][0] for w, row in zip(weights, rows)) / sum(weights)
            assert files[file_id][0] == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert files[file_id][1] == segments[rows[0]["segment_id"]][1]
        for level in ("segments", "files"):
            result = yaml.safe_load((folder / level / "result.yaml").read_text())
            assert result["model"]["loaded_from"]["format"] == "checkpoint"
            assert result["counts"]["trials"] == len(segments if level == "segments" else files)
            assert (folder / level / "det.png").is_file()


def test_mlflow_run_has_training_and_test_metrics(launched):
    with sqlite3.connect(launched["work"] / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
        assert len(runs) == 1 and runs[0][1] == "FINISHED"
        names = {name for (name,) in db.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", (runs[0][0],))}
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (runs[0][0],)).fetchall())
    assert {"train/loss", "test/2s/segment_eer", "test/2s/file_eer", "test/4s/segment_eer", "test/4s/file_eer"} <= names
    assert params["finetune.init_from"] == str(launched["init"])
    assert read_metadata(launched["out"] / "checkpoints" / "step-00000002")["mlflow_run_id"] == runs[0][0]
