"""The fine-tune stage as a user runs it: ``accelerate launch finetune.py`` with SAM from a posttrain
checkpoint, then ``posttrain publish`` and ``posttrain eval`` on what it wrote; plus its pieces
(config precedence with accelerate, segment -> file aggregation, config errors)."""

from __future__ import annotations

import csv
import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from posttrain.cli import main as cli_main
from posttrain.config import ConfigError, FinetuneConfig, load_config
from posttrain.eval.inference import SampleOutput
from posttrain.models.score_definitions import LOGIT_DIFF
from posttrain.train.checkpoint import read_metadata, resolve_checkpoint
from posttrain.finetuning import file_records, plugin_deepspeed_config, resolve_data, with_plugin_stage

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _entry_point():
    spec = importlib.util.spec_from_file_location("finetune_entry", REPO / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ pieces


def test_config_errors_name_the_key(capsys):
    assert _entry_point().main(["--config", str(REPO / "configs/finetune/df2024.yaml"), "finetune.init_from=''"]) == 2
    assert "finetune.init_from: required" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^model.pretrained:"):
        load_config(None, ["finetune.init_from=x", "model.pretrained=facebook/wav2vec2-base"], cls=FinetuneConfig)
    cfg = load_config(REPO / "configs/finetune/df2024.yaml", cls=FinetuneConfig)
    assert (cfg.optim.lr, cfg.train.max_epochs, cfg.train.max_steps) == (1e-6, 10, 50_000)
    assert cfg.rawboost.enabled and cfg.rawboost.algo == 5
    assert load_config(REPO / "configs/finetune/df2024_sam.yaml", cls=FinetuneConfig).sam.enabled


def test_antideepfake_parity_config_ramps_to_6_25e_7_and_tests_the_best_checkpoint(tmp_path):
    from posttrain.train.checkpoint import CheckpointError, write_pointer
    from posttrain.train.trainer import TrainResult
    from posttrain.finetuning import checkpoint_to_test
    from posttrain.train.schedule import lr_factor

    cfg = load_config(REPO / "configs/finetune/df2024_antideepfake.yaml", cls=FinetuneConfig)
    # AD's WarmAndExpDecayLRSchedule(n_warmup_steps=80000, total_steps=50000): the 50,000th step at 50k/80k
    factors = [lr_factor(step, cfg.schedule) for step in (0, 24_999, cfg.train.max_steps - 1)]
    assert [cfg.optim.lr * f for f in factors] == pytest.approx([1e-6 / 80_000, 1e-6 * 25_000 / 80_000, 6.25e-7])
    assert (cfg.train.precision, cfg.train.valid_every_steps, cfg.finetune.test_checkpoint) == ("fp32", 20_000, "best")
    with pytest.raises(ConfigError, match=r"^finetune.test_checkpoint: 'best' needs a validation set"):
        load_config(None, ["finetune.init_from=x", "finetune.test_checkpoint=best"], cls=FinetuneConfig)
    cfg = load_config(None, ["finetune.init_from=x", f"output_dir={tmp_path}", "finetune.test_checkpoint=best",
                             f"data.valid.shards=[{tmp_path}]"], cls=FinetuneConfig)
    result = TrainResult(progress=None, output_dir=tmp_path, last_checkpoint=tmp_path / "checkpoints/step-00000009",
                         mlflow_run_id=None)
    with pytest.raises(CheckpointError, match="no 'best' checkpoint"):
        checkpoint_to_test(cfg, result)
    (tmp_path / "checkpoints/step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints/step-00000004/posttrain.json").write_text("{}")  # marks the tag complete
    write_pointer(tmp_path / "checkpoints", "step-00000004", "best")
    assert checkpoint_to_test(cfg, result) == tmp_path / "checkpoints/step-00000004"
    cfg.finetune.test_checkpoint = "final"
    assert checkpoint_to_test(cfg, result) == result.last_checkpoint


def test_data_from_the_df2024_folder(tiny_df2024, tmp_path):
    cfg = resolve_data(load_config(None, ["finetune.init_from=x", f"finetune.df2024_dir={tiny_df2024}",
                                          "finetune.train_segment_seconds=4",
                                          "finetune.eval_segment_seconds=[2, 4, 13]"], cls=FinetuneConfig))
    assert cfg.data.train.shards == [str(tiny_df2024 / "shards/4s/train")]
    # 13 s was not built: left out rather than failing at the end of training
    assert [(t.name, t.shards, t.segments_csv) for t in cfg.finetune.test_sets] == [
        (f"{n}s", str(tiny_df2024 / f"shards/{n}s/test"), str(tiny_df2024 / f"{n}s/segments.csv")) for n in (2, 4)]
    with pytest.raises(ConfigError, match=r"^data.train.shards\[0\]: .*no index.json"):
        resolve_data(load_config(None, ["finetune.init_from=x", f"data.train.shards=[{tmp_path}]"], cls=FinetuneConfig))
    with pytest.raises(ConfigError, match=r"^finetune.test_sets\[0\].shards:"):
        resolve_data(load_config(None, ["finetune.init_from=x", f"data.train.shards=[{tiny_df2024}/shards/2s/train]",
                                        f"finetune.test_sets=[{{name: a, shards: {tmp_path}}}]"], cls=FinetuneConfig))


def test_accelerate_keeps_zero_settings_posttrain_keeps_step_settings():
    accelerate_config = {  # what accelerate's DeepSpeedPlugin builds from a config with zero_stage 3 + offload
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
        "gradient_clipping": "auto", "steps_per_print": float("inf"), "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "nvme_path": None},
                              "stage3_gather_16bit_weights_on_model_save": False, "reduce_bucket_size": "auto"}}
    cfg = load_config(None, ["finetune.init_from=x", "train.grad_accum_steps=4", "train.precision=fp32",
                             "train.zero_stage=1",
                             "train.deepspeed_overrides={zero_optimization: {overlap_comm: true}}"],
                      cls=FinetuneConfig)
    merged = plugin_deepspeed_config(accelerate_config, cfg)
    zero = merged["zero_optimization"]
    assert zero["stage"] == 3 and with_plugin_stage(cfg, accelerate_config).train.zero_stage == 3  # recorded
    assert cfg.train.zero_stage == 1  # in a resolved copy: the validated config is never changed
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == cfg.train.reduce_bucket_elements  # accelerate's "auto" becomes posttrain's
    assert zero["stage3_param_persistence_threshold"] == 0  # SAM perturbs owned partitions only
    assert zero["overlap_comm"] is True  # train.deepspeed_overrides last
    assert merged["gradient_accumulation_steps"] == 4 and merged["gradient_clipping"] == 100.0
    assert merged["bf16"]["enabled"] is False
    assert merged["train_micro_batch_size_per_gpu"] == 1 and "train_batch_size" not in merged
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        plugin_deepspeed_config({"zero_optimization": {"stage": 0}}, cfg)


def _output(sample_id: str, logits: list[float], num_samples: int, label: str) -> SampleOutput:
    return SampleOutput(0, sample_id, {"label": label, "corpus": "DF2024"}, np.array(logits), None, 1, num_samples)


def test_file_scores_from_segments_by_id_convention():
    outputs = [_output("DF2024-x-4s-1", [0.0, -1.0], 16000, "fake"), _output("DF2024-y-4s-0", [0.5, 2.5], 64000, "real"),
               _output("DF2024-x-4s-0", [1.0, 3.0], 64000, "fake"), _output("DF2024-x-4s-2", [0.2, 0.0], 8000, "fake")]
    mean = {r["id"]: r for r in file_records(outputs, None, "mean_logits", LOGIT_DIFF)}
    # x: logit_diff per segment 2.0 (64000), -1.0 (16000), -0.2 (8000)
    assert mean["DF2024-x"]["score"] == pytest.approx((2.0 * 64000 - 1.0 * 16000 - 0.2 * 8000) / 88000)
    assert (mean["DF2024-y"]["score"], mean["DF2024-y"]["label"]) == (2.0, "real")
    worst = {r["id"]: r for r in file_records(outputs, None, "max_fake", LOGIT_DIFF)}
    assert (worst["DF2024-x"]["logit_fake"], worst["DF2024-x"]["logit_real"]) == (0.0, -1.0)
    with pytest.raises(ValueError, match="different labels"):
        file_records(outputs + [_output("DF2024-x-4s-3", [0.0, 0.0], 100, "real")], None, "mean_logits", LOGIT_DIFF)
    with pytest.raises(ValueError, match="no segments.csv"):
        file_records([_output("DF2024-x", [0.0, 0.0], 100, "real")], None, "mean_logits", LOGIT_DIFF)


# ------------------------------------------------------------------------------------ the whole stage


@pytest.mark.slow
def test_sam_finetune_from_a_checkpoint_then_publish_and_eval(tiny_df2024, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--use_deepspeed",
               "--zero_stage", "1", "--mixed_precision", "no", str(REPO / "finetune.py"),
               "--config", str(REPO / "configs/finetune/df2024_sam.yaml"), f"output_dir={out}",
               f"finetune.init_from={tiny_checkpoint}/checkpoints", "finetune.init_preset=null",
               "model.gradient_checkpointing=false", f"finetune.df2024_dir={tiny_df2024}",
               "finetune.train_segment_seconds=4", "finetune.eval_segment_seconds=[4]", "data.train.num_workers=0",
               "data.train.max_batch_seconds=8", "train.device=cpu", "train.precision=fp32", "train.max_steps=2",
               "train.log_every_steps=2", "optim.lr=0.001", "sam.rho=0.05",
               f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.system_metrics=false"]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    summary = done.stdout[done.stdout.index("fine-tuned 2 steps"):]  # the summary a user reads at the end
    (row,) = [line for line in summary.splitlines() if line.startswith("4s ")]
    assert f"{out / 'eval' / '4s' / 'segments'}/" in row and f"{out / 'eval' / '4s' / 'files'}/" in row
    assert "segment EER %" in summary and f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in summary

    metadata = read_metadata(resolve_checkpoint(out / "checkpoints"))
    assert metadata["step_mode"] == "sam" and metadata["zero_stage"] == 1 and metadata["progress"]["step"] == 2
    assert metadata["preset"] == "tiny"  # taken from the post-trained checkpoint it started from
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        names = {name for (name,) in db.execute("SELECT DISTINCT key FROM metrics")}
        steps_logged = dict(db.execute("SELECT key, COUNT(DISTINCT step) FROM metrics "
                                       "WHERE key IN ('train/sam/grad_norm', 'train/loss') GROUP BY key"))
    assert {"train/sam/grad_norm", "train/sam/loss_increase", "test/4s/segment_eer", "test/4s/file_eer"} <= names
    assert steps_logged == {"train/sam/grad_norm": 2, "train/loss": 1}  # step-mode diagnostics: every step

    report = out / "eval" / "4s"
    export = tmp_path / "export"
    for args in (["publish", "--checkpoint", str(out / "checkpoints"), "--out", str(export),
                  "--results", str(report / "files" / "result.yaml")],
                 ["eval", "--model", str(export), "--shards", str(tiny_df2024 / "shards/4s/test"),
                  "--out", str(tmp_path / "eval"), "--window-seconds", "0", "--no-progress"]):
        assert cli_main(args) == 0, args[0]
    assert "fake" in (export / "config.json").read_text() and (export / "README.md").is_file()
    # the published model scores the test segments as the fine-tune's own report did
    def scores(path):
        with open(path, newline="") as handle:
            return {row["ID"]: float(row["Score"]) for row in csv.DictReader(handle)}
    ours, theirs = scores(report / "segments" / "scores.csv"), scores(tmp_path / "eval" / "scores.csv")
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5) for key in ours)
    result = yaml.safe_load((report / "files" / "result.yaml").read_text())
    assert result["data"]["file_aggregation"] == "mean_logits" and result["counts"]["trials"] == 6
