"""train.precision: fp16, AntiDeepfake's precision, with DeepSpeed's dynamic loss scaling (a real run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import train_tiny

from posttrain.config import ConfigError, load_config
from posttrain.train.engine_config import deepspeed_config


def test_fp16_gets_loss_scaling_like_torch_gradscaler_and_refuses_sam_and_dual_path():
    config = deepspeed_config(load_config(None, ["train.precision=fp16"]))
    assert config["bf16"] == {"enabled": False}
    # GradScaler(init_scale=2**16, backoff 0.5 on every overflow, growth x2 after 2000 clean steps)
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000,
                              "hysteresis": 1, "min_loss_scale": 1}
    assert deepspeed_config(load_config(None, []))["fp16"]["enabled"] is False
    for section in ("sam", "dual_path"):
        with pytest.raises(ConfigError, match=rf"train\.precision.*fp16.*{section}\.enabled"):
            load_config(None, ["train.precision=fp16", f"{section}.enabled=true"])


@pytest.mark.slow
def test_fp16_post_training_runs_with_half_weights(shard_dir, tmp_path):
    out = tmp_path / "run"
    # DeepSpeed's CPU accelerator reports fp16 only where oneDNN has fp16 kernels (AVX512-FP16, AMX-FP16);
    # torch's CPU half kernels run everywhere, so where it says no, the check is patched and posttrain's
    # fp16 path (loss scaling, overflow handling) still runs for real on every CI machine
    prelude = ("from deepspeed.accelerator import get_accelerator\naccelerator = get_accelerator()\n"
               "if not accelerator.is_fp16_supported():\n"
               "    type(accelerator).is_fp16_supported = lambda self: True\n")
    done = train_tiny(out, shard_dir, "train.max_steps=3", "train.zero_stage=2", "train.precision=fp16",
                      "schedule.decay_end_steps=2", prelude=prelude)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "STEPS 3" in done.stdout
    (states,) = (out / "checkpoints").glob("step-*/mp_rank_00_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)  # our own DeepSpeed file
    assert {tensor.dtype for tensor in saved["module"].values()} == {torch.float16}  # the engine ran in fp16
    assert saved["ds_config"]["fp16"]["enabled"] and not saved["ds_config"]["bf16"]["enabled"]


def test_fp16_where_the_device_has_none_is_one_line_naming_the_key(shard_dir, tmp_path, monkeypatch, capsys):
    from deepspeed.accelerator import get_accelerator

    from posttrain.cli import main

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    code = main(["train", "--config", str(Path(__file__).resolve().parents[2] / "configs/posttrain/demo.yaml"),
                 f"output_dir={tmp_path / 'run'}", "model.preset=tiny", "train.precision=fp16",
                 "train.device=cpu", "tracking.enabled=false", f"data.train.shards=[{shard_dir}]",
                 "data.valid.shards=[]", "data.train.num_workers=0", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "train.precision: fp16 is not supported by DeepSpeed's cpu accelerator" in line and "bf16" in line


def test_fp16_fine_tune_keeps_posttrains_loss_scaling_whatever_accelerate_says():
    from posttrain.config import FinetuneConfig
    from posttrain.finetuning import plugin_deepspeed_config

    cfg = load_config(None, ["finetune.init_from=x", "train.precision=fp16"], cls=FinetuneConfig)
    merged = plugin_deepspeed_config({"bf16": {"enabled": True}, "fp16": {"enabled": "auto", "loss_scale": 128},
                                      "zero_optimization": {"stage": 2}}, cfg)
    assert merged["bf16"] == {"enabled": False}
    assert merged["fp16"]["enabled"] is True and merged["fp16"]["loss_scale"] == 0  # dynamic, as GradScaler
