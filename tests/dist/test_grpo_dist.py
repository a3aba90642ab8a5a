"""GRPO fine-tuning at world size 2 under ZeRO-3 (``accelerate launch finetune.py``, CPU, gloo): a run killed
with SIGKILL mid-way and resumed ends with the weights of an uninterrupted one, bit for bit; the frozen
models are sharded as the policy (the old policy is saved per rank); the metrics GRPO logs are there.

The launched script wraps the registered ``grpo`` step (same setup) to record each step's metrics per rank
and to SIGKILL rank 1 at the start of a chosen step, then runs ``finetune.py``'s ``main`` unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.dist import free_port
from posttrain.train.checkpoint import read_metadata, read_pointer

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
KILL_AT_STEP = 4  # rank 1 dies when step 4 starts: checkpoints of steps 1-3 are on disk
INNER_STEPS = 2  # the old policy is refreshed after steps 2, 4, 6: the resume (from step 3) needs step 2's

PROBE_SCRIPT = '''
import json, os, signal, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
from posttrain.train.grpo import grpo_step, set_up_grpo
from posttrain.train.step import register_step_mode

@register_step_mode("grpo_probe", setup=set_up_grpo)
def probe_step(engine, micro_batches, ctx):
    if dist.get_rank() == 1 and ctx.step + 1 == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    stats = grpo_step(engine, micro_batches, ctx)
    record = {{"rank": dist.get_rank(), "step": ctx.step + 1, "loss": stats.loss, "extra": stats.extra,
              "samples": stats.samples, "refreshes": ctx.state["grpo"]["refreshes"]}}
    with open(os.path.join({probe_dir!r}, f"rank{{dist.get_rank()}}.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\\n")
    return stats

import finetune
sys.exit(finetune.main())
'''


def _launch(work: Path, out: Path, tiny_df2024: Path, init: Path, kill_at: int) -> subprocess.CompletedProcess:
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    script = work / "finetune_probe.py"
    script.write_text(PROBE_SCRIPT.format(repo=str(REPO), probe_dir=str(probe_dir), kill_at=kill_at))
    accelerate_config = yaml.safe_load((REPO / "configs/accelerate/cpu_2proc.yaml").read_text())
    accelerate_config["deepspeed_config"]["zero_stage"] = 3
    (work / "accelerate_zero3.yaml").write_text(yaml.safe_dump(accelerate_config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(work / "accelerate_zero3.yaml"),
               "--main_process_port", str(free_port()), str(script),
               "--config", str(REPO / "configs/finetune/df2024.yaml"), f"output_dir={out}",
               f"finetune.init_from={init}", "finetune.init_preset=null", "model.preset=tiny",
               "model.gradient_checkpointing=false", "model.pool_over_padding=true", f"finetune.df2024_dir={tiny_df2024}",
               "finetune.train_segment_seconds=2", "finetune.evaluate=false",
               f"data.train.shards=[{tiny_df2024 / 'shards/2s/train_x3'}]", "data.train.num_workers=0",
               "data.train.max_batch_seconds=4", "train.device=cpu", "train.precision=fp32",
               f"train.max_steps={STEPS}", "train.step_mode=grpo_probe", "grpo.enabled=true", "grpo.variant=grpo3",
               "grpo.sample_num=16", f"grpo.inner_step_size={INNER_STEPS}", "optim.lr=0.001", "rawboost.enabled=false",
               "train.log_every_steps=1", "checkpoint.every_steps=1", "checkpoint.keep_last=50",
               "tracking.enabled=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=work, timeout=600)


def _records(work: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((work / "probe").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from posttrain.train.checkpoint import consolidate_fp32

    state, _ = consolidate_fp32(out / "checkpoints")
    return state


@pytest.fixture(scope="module")
def runs(tiny_df2024, tiny_export_dir, tmp_path_factory):
    whole = tmp_path_factory.mktemp("grpo_whole")
    done = _launch(whole, whole / "run", tiny_df2024, tiny_export_dir, kill_at=0)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    killed = tmp_path_factory.mktemp("grpo_killed")
    first = _launch(killed, killed / "run", tiny_df2024, tiny_export_dir, kill_at=KILL_AT_STEP)
    assert first.returncode != 0 and read_pointer(killed / "run/checkpoints") == "step-00000003", first.stderr[-3000:]
    second = _launch(killed, killed / "run", tiny_df2024, tiny_export_dir, kill_at=0)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    return {"whole": whole, "killed": killed}


def test_a_killed_and_resumed_grpo_run_ends_with_the_uninterrupted_weights(runs):
    whole, resumed = _weights(runs["whole"] / "run"), _weights(runs["killed"] / "run")
    assert whole.keys() == resumed.keys()
    differences = {key: (whole[key] - resumed[key]).abs().max().item() for key in whole}
    assert max(differences.values()) == 0.0, sorted(differences.items(), key=lambda item: -item[1])[:5]
    initial = _weights_of_init(runs)
    assert max((whole[key] - initial[key]).abs().max().item() for key in whole if key in initial) > 0  # it trained
    # the resumed steps saw the metrics the uninterrupted ones saw (sampling depends on the step only)
    by_step = lambda records: {(r["rank"], r["step"]): (r["loss"], r["extra"]) for r in records}  # noqa: E731
    whole_steps, resumed_steps = by_step(_records(runs["whole"])), by_step(_records(runs["killed"]))
    assert set(resumed_steps) == set(whole_steps) == {(rank, step) for rank in (0, 1) for step in range(1, STEPS + 1)}
    assert resumed_steps == whole_steps


def _weights_of_init(runs) -> dict[str, torch.Tensor]:
    from posttrain.loading import load_model

    config = yaml.safe_load((runs["whole"] / "run/config.yaml").read_text())
    detector, _ = load_model(config["finetune"]["init_from"])
    return {key: value.float() for key, value in detector.state_dict().items()}


def test_the_old_policy_is_saved_in_partitions_and_refreshed_on_schedule(runs):
    root = runs["killed"] / "run/checkpoints"
    for step in (1, 2, 3):
        tag = root / f"step-{step:08d}"
        files = sorted(path.name for path in (tag / "grpo_old_policy").iterdir())
        assert files == ["rank00000.safetensors", "rank00001.safetensors"]  # a share per rank, no full copy
        state = read_metadata(tag)["step_state"]["grpo"]
        assert (state["refreshes"], state["old_policy_step"]) == (step // INNER_STEPS, INNER_STEPS * (step // INNER_STEPS))
    from safetensors.torch import load_file

    # ZeRO-3 shares: each rank's file holds about half of the parameters
    shares = [sum(t.numel() for k, t in load_file(str(root / f"step-00000003/grpo_old_policy/rank{r:05d}.safetensors"))
                  .items() if k.startswith("param.")) for r in (0, 1)]
    total = sum(v.numel() for v in _weights(runs["whole"] / "run").values())
    assert abs(shares[0] - shares[1]) <= 2 * 64 and total / 2 <= shares[0] <= total / 2 + 1024, (shares, total)


def test_grpo_logs_rewards_kl_clipping_and_refreshes(runs):
    records = [r for r in _records(runs["whole"]) if r["rank"] == 0]
    first = records[0]["extra"]
    # step 1: the reference and the old policy are copies of the policy (no dropout in the tiny preset) and
    # see the batch as it does (padding pooled, model.pool_over_padding)
    assert first["grpo/kl"] == pytest.approx(0.0, abs=1e-12) and first["grpo/clip_fraction"] == 0.0
    assert all(0.0 <= r["extra"]["grpo/reward"] <= 1.0 for r in records)
    assert [r["refreshes"] for r in records] == [step // INNER_STEPS for step in range(1, STEPS + 1)]
    assert any(r["extra"]["grpo/kl"] > 0 for r in records[1:])  # the policy moved away from the reference
