"""GRPO's frozen models in bf16 (the precision of a real run; tests/dist/test_grpo_dist.py runs fp32): under
ZeRO-2 a stage-0 engine with the full bf16 weights, under ZeRO-3 an optimiser-less engine over bf16
partitions. After ``copy_from`` they give the policy's logits exactly, before and after an update."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from posttrain.dist import free_port

SCRIPT = r'''
import json, os, sys, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed
from posttrain.config import load_config
from posttrain.dist import start_process_group
from posttrain.models.detector import build_detector
from posttrain.train.engine_config import deepspeed_config
from posttrain.train.grpo import FrozenModel
from posttrain.train.trainer import build_optimizer

stage = int(sys.argv[1])
cfg = load_config(None, ["model.preset=tiny", f"train.zero_stage={stage}", "train.precision=bf16", "train.device=cpu",
                         "tracking.enabled=false", "optim.lr=0.01"])
start_process_group(torch.device("cpu"), deepspeed=True)
torch.manual_seed(0)
model = build_detector(cfg.model)
optimizer = build_optimizer(model, cfg)
config = deepspeed_config(cfg, device_type="cpu")
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
frozen = FrozenModel(build_detector(cfg.model), config)
batch = type("Batch", (), {"waveforms": torch.randn(2, 16000), "lengths": torch.tensor([16000, 12000])})()

def policy_logits():
    engine.eval()
    with torch.no_grad():
        logits = engine(batch.waveforms, batch.lengths).float()
    engine.train()
    return logits

frozen.copy_from(engine)
before = (policy_logits() - frozen.logits(batch)).abs().max().item()
loss = engine(batch.waveforms, batch.lengths).float().sum()
engine.backward(loss)
engine.step()
stale = (policy_logits() - frozen.logits(batch)).abs().max().item()
frozen.copy_from(engine)
after = (policy_logits() - frozen.logits(batch)).abs().max().item()
dtypes = sorted({str(p.dtype) for p in frozen.engine.module.parameters()})
print(json.dumps({"before": before, "stale": stale, "after": after, "dtypes": dtypes,
                  "partitioned": frozen.partitioned, "trainable": any(p.requires_grad for p in frozen.engine.module.parameters())}))
'''


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_models_hold_the_policys_bf16_weights_sharded_as_it_is(stage, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(stage), str(free_port())], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dtypes"] == ["torch.bfloat16"] and result["partitioned"] == (stage == 3)
    assert not result["trainable"]
    assert result["before"] == 0.0 and result["after"] == 0.0
    assert result["stale"] > 0  # the update moved the policy away from the copy until the refresh
