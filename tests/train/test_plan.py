"""The resource planner against DeepSpeed's own estimators and independent arithmetic."""

from __future__ import annotations

import dataclasses
import math

import pytest

from posttrain.models.presets import get_preset
from posttrain.train import plan as planner
from posttrain.train.flops import forward_flops_per_audio_second

BIG = ("xlsr_300m", "xlsr_1b", "xlsr_2b")


def _request(**kwargs) -> planner.PlanRequest:
    return dataclasses.replace(planner.PlanRequest(), **kwargs)


def test_parameter_counts_match_deepspeeds_live_model_count_and_the_released_sizes():
    import torch

    from deepspeed.runtime.zero.stage3 import model_to_params

    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    model = build_detector(ModelConfig(preset="tiny"))
    assert planner.parameter_counts("tiny") == model_to_params(model)
    for preset in BIG:  # the meta-device count vs the published model sizes (2B: "2.2B", 2.16B exactly)
        total, largest = planner.parameter_counts(preset)
        assert total == pytest.approx(get_preset(preset).params_millions * 1e6, rel=0.03)
        hidden, ffn = get_preset(preset).config_kwargs["hidden_size"], get_preset(preset).config_kwargs["intermediate_size"]
        assert largest >= hidden * ffn  # the feed-forward matrix is the largest or the pos conv is
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("preset", BIG)
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_bf16_model_states_equal_deepspeeds_estimators(preset, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = planner.parameter_counts(preset)
    zero2 = planner.memory_breakdown(_request(preset=preset, zero_stage=2, gpus=gpus)).model_states
    _, expected2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    assert zero2 == pytest.approx(expected2, abs=1.0)
    zero3 = planner.memory_breakdown(_request(preset=preset, zero_stage=3, gpus=gpus)).model_states
    _, expected3, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, cpu_offload=False)
    assert zero3 == pytest.approx(expected3, abs=1.0)
    # stage 1 keeps the whole bf16 gradient on every GPU: stage 2 plus the 2 P (1 - 1/N) stage 2 shards
    zero1 = planner.memory_breakdown(_request(preset=preset, zero_stage=1, gpus=gpus)).model_states
    assert zero1 == pytest.approx(expected2 + 2 * total * (1 - 1 / gpus), abs=1.0)


def test_sam_extra_copy_by_stage_precision_and_variant():
    total, _ = planner.parameter_counts("xlsr_1b")
    extra = lambda **kw: planner.memory_breakdown(_request(preset="xlsr_1b", gpus=4, **kw)).sam_extra  # noqa: E731
    assert extra(sam=False, zero_stage=3, precision="fp32") == 0
    assert extra(sam=True, zero_stage=2, precision="bf16") == 0  # restored from the fp32 master
    assert extra(sam=True, zero_stage=3, precision="bf16") == 0
    assert extra(sam=True, zero_stage=3, precision="fp32") == pytest.approx(4 * total / 4)
    assert extra(sam=True, zero_stage=2, precision="bf16", sam_variant="looksam") == pytest.approx(4 * total / 4)


def test_unfused_adamw_needs_two_partition_sized_temporaries():
    total, _ = planner.parameter_counts("xlsr_300m")
    fused = planner.memory_breakdown(_request(gpus=2)).optimizer_step_transient
    unfused = planner.memory_breakdown(_request(gpus=2, fused_adamw=False)).optimizer_step_transient
    assert fused == 0 and unfused == pytest.approx(2 * 4 * total / 2)


def test_activations_scale_with_batch_seconds_and_shrink_with_checkpointing():
    on = planner.memory_breakdown(_request(batch_seconds=50.0)).activations
    assert planner.memory_breakdown(_request(batch_seconds=100.0)).activations == pytest.approx(2 * on)
    off = planner.memory_breakdown(_request(batch_seconds=50.0, gradient_checkpointing=False)).activations
    assert off > 2 * on


def test_largest_batch_is_the_edge_of_fitting():
    request = _request(preset="xlsr_2b", zero_stage=3, gpus=4, gpu_memory_gib=40.0, batch_seconds=10.0)
    result = planner.plan(request)
    edge = result.max_batch_seconds
    assert edge > 0
    budget = request.gpu_memory_gib * planner.GIB
    assert planner.memory_breakdown(request, edge).total <= budget < planner.memory_breakdown(request, edge + 1).total
    assert planner.plan(dataclasses.replace(request, batch_seconds=edge)).fits
    assert not planner.plan(dataclasses.replace(request, batch_seconds=edge + 1)).fits
    tiny_gpu = planner.plan(dataclasses.replace(request, gpus=1, zero_stage=2, gpu_memory_gib=8.0))
    assert not tiny_gpu.fits and tiny_gpu.max_batch_seconds == 0


def test_step_and_run_time_follow_the_analytic_flops():
    request = _request(preset="xlsr_1b", batch_seconds=100.0, grad_accum_steps=2, gpus=8, hfu=0.4,
                       peak_tflops=1000.0, steps=0, audio_hours=1000.0, epochs=2.0, gradient_checkpointing=False)
    config = get_preset("xlsr_1b").ssl_config()
    flops = 3 * forward_flops_per_audio_second(config, 4.0) * 200.0
    result = planner.plan(request)
    assert result.step_seconds == pytest.approx(flops / (0.4 * 1000e12))
    assert result.steps == math.ceil(1000 * 3600 * 2 / (100 * 2 * 8))
    assert result.run_seconds == pytest.approx(result.steps * result.step_seconds)
    assert planner.plan(dataclasses.replace(request, sam=True)).step_seconds == pytest.approx(2 * result.step_seconds)
    looksam = planner.plan(dataclasses.replace(request, sam=True, sam_variant="looksam", looksam_every_steps=5))
    assert looksam.step_seconds == pytest.approx(1.2 * result.step_seconds)
    # ESAM: the first pass, a no-grad forward (one of the three forward-units of a pass), the second
    # pass on 30 % of the samples
    esam = planner.plan(dataclasses.replace(request, sam=True, sam_variant="esam", esam_data_fraction=0.3))
    assert esam.step_seconds == pytest.approx((1 + 1 / 3 + 0.3) * result.step_seconds)
    # activation checkpointing runs each forward again in the backward: 4 forward-units executed, not 3;
    # the MFU keeps the model-FLOPs convention (3), so it reads hfu x 3/4
    recomputed = planner.plan(dataclasses.replace(request, gradient_checkpointing=True))
    assert recomputed.step_seconds == pytest.approx(4 / 3 * result.step_seconds)
    assert result.mfu == pytest.approx(0.4) and recomputed.mfu == pytest.approx(0.3)


def test_bad_requests_name_the_key():
    with pytest.raises(ValueError, match=r"plan\.gpus"):
        planner.plan(_request(gpus=0))
    with pytest.raises(ValueError, match=r"plan\.zero_stage"):
        planner.plan(_request(zero_stage=4))


def test_plan_command_reads_a_training_config_and_reports_fit(capsys):
    from posttrain.cli import main

    assert main(["plan", "--config", "configs/posttrain/xlsr_2b.yaml", "--gpus", "8", "--gpu-memory-gib", "80",
                 "--steps", "1000"]) == 0
    out = capsys.readouterr().out
    assert "preset xlsr_2b" in out and "ZeRO-3" in out and "fits" in out and "1,000 steps" in out
    assert main(["plan", "--preset", "xlsr_2b", "--zero-stage", "2", "--gpus", "1", "--gpu-memory-gib", "16"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_plan_takes_a_gpu_by_name_nodes_by_gpus_per_node_and_names_a_bad_preset_flag(capsys):
    from posttrain.cli import main

    assert main(["plan", "--preset", "xlsr_1b", "--gpu", "a100-40gb", "--nodes", "2", "--gpus-per-node", "4",
                 "--steps", "100"]) in (0, 1)
    out = capsys.readouterr().out
    assert "8 GPU(s) (a100-40gb) x 40 GiB" in out and "of 312 TFLOP/s" in out
    assert main(["plan", "--preset", "xlsr_1b", "--gpu", "h200", "--gpus", "16"]) == 0
    assert "(h200) x 141 GiB" in capsys.readouterr().out
    assert main(["plan", "--preset", "xlsr_1b", "--nodes", "2", "--gpus-per-node", "8", "--gpus", "12"]) == 2
    assert "--gpus 12 is not --nodes 2 x --gpus-per-node 8 = 16" in capsys.readouterr().err
    assert main(["plan", "--preset", "xlsr_3b"]) == 2
    err = capsys.readouterr().err
    assert "--preset: unknown preset 'xlsr_3b'" in err and "model.preset" not in err
    for name, spec in planner.GPUS.items():  # every entry is a dense (not sparse) figure of a real part
        assert 100 < spec.peak_bf16_tflops < 2000 and 16 <= spec.memory_gib <= 256, name


def test_checkpoint_bytes_match_a_real_deepspeed_checkpoint_and_the_lead_time_covers_step_and_write(tiny_checkpoint):
    """The tiny run's ZeRO-1 fp32 checkpoint on disk (DeepSpeed's own files) against the planned bytes:
    pickling and buffers add a little, never less than planned."""
    from posttrain.train.checkpoint import read_pointer

    tag_dir = tiny_checkpoint / "checkpoints" / read_pointer(tiny_checkpoint / "checkpoints")
    written = sum(path.stat().st_size for path in tag_dir.glob("*.pt"))
    request = planner.PlanRequest(preset="tiny", zero_stage=1, precision="fp32", gpus=1, fused_adamw=False)
    planned = planner.plan(request).checkpoint
    assert 1.0 <= written / planned.total_bytes <= 1.1
    # measured time replaces the estimate; the lead covers a step and the write with margin
    slow = planner.plan(dataclasses.replace(request, checkpoint_seconds=200.0))
    assert slow.checkpoint.measured and slow.checkpoint.write_seconds == 200.0
    assert slow.checkpoint.stop_lead_seconds == 10 * math.ceil((1.5 * (slow.step_seconds + 200.0) + 30) / 10)
    # ZeRO-3 spreads the weights too: the busiest of 8 nodes writes an eighth
    spread = planner.plan(planner.PlanRequest(preset="xlsr_2b", zero_stage=3, gpus=64, nodes=8)).checkpoint
    assert spread.busiest_node_bytes == pytest.approx(spread.total_bytes / 8)



@pytest.mark.parametrize("zero_stage", [2, 3])
def test_grpo_frozen_models_cost_a_weight_copy_each_sharded_as_the_policy_and_a_forward_each(zero_stage, capsys):
    request = _request(preset="xlsr_2b", zero_stage=zero_stage, precision="bf16", gpus=64, gradient_checkpointing=True)
    base = planner.plan(request)
    parameters, largest = planner.parameter_counts("xlsr_2b")
    # the policy's own bf16 weights per GPU, without ZeRO-3's gathered module (the frozen models reuse the gather)
    policy_weights = base.memory.parameters - (2 * largest if zero_stage == 3 else 0)
    assert policy_weights == pytest.approx(2 * parameters / 64 if zero_stage == 3 else 2 * parameters)
    for frozen in (1, 2):
        grpo = planner.plan(dataclasses.replace(request, frozen_models=frozen))
        assert grpo.memory.frozen_models == pytest.approx(frozen * policy_weights)
        assert grpo.memory.total - base.memory.total == pytest.approx(frozen * policy_weights)
        # each frozen model runs one no-grad forward: 1 of the 4 forward-units a checkpointed step executes
        assert grpo.step_seconds == pytest.approx(base.step_seconds * (4 + frozen) / 4)
    # GRPO (reference + old policy) saves the old policy with every checkpoint: one more copy of the weights
    assert (planner.plan(dataclasses.replace(request, frozen_models=2)).checkpoint.total_bytes
            - base.checkpoint.total_bytes) == pytest.approx(2 * parameters)
    from posttrain.cli import main

    assert main(["plan", "--config", "configs/finetune/df2024_grpo.yaml", "--gpus", "64", "--zero-stage", "3"]) == 0
    assert "(2: reference + old policy)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"plan\.frozen_models"):
        planner.plan(_request(frozen_models=3))
