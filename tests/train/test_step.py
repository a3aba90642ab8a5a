"""Step-mode registry and the building blocks every step mode shares (no process group needed here;
the full steps run under DeepSpeed in tests/dist/test_engine_dist.py)."""

import pytest
import torch

from posttrain.config import load_config
from posttrain.data.batch import TRANSFORMERS_INPUT_EPS as EPS
from posttrain.data.batch import Batch
from posttrain.train import step as step_module
from posttrain.train.trainer import micro_batch_groups
from posttrain.train.engine_config import deepspeed_config
from posttrain.train.step import (SkippableAdamW, get_step_mode, loss_scale, make_augment, model_inputs,
                                  register_step_mode, step_mode_name)


def test_registry_selects_modes_from_the_config():
    assert step_mode_name(load_config(None, [])) == "plain"
    assert step_mode_name(load_config(None, ["sam.enabled=true"])) == "sam"
    assert step_mode_name(load_config(None, ["dual_path.enabled=true"])) == "dual_path"
    assert step_mode_name(load_config(None, ["sam.enabled=true", "train.step_mode=custom"])) == "custom"
    assert get_step_mode("plain") is step_module.plain_step
    with pytest.raises(ValueError, match="unknown step mode 'nope'.*plain"):
        get_step_mode("nope")


def test_register_refuses_a_second_function_under_a_taken_name():
    def mode(engine, micro_batches, ctx):
        raise AssertionError("not called")

    register_step_mode("test_step_mode")(mode)
    assert get_step_mode("test_step_mode") is mode
    register_step_mode("test_step_mode")(mode)  # same function again: fine (module re-import)
    with pytest.raises(ValueError, match="already registered"):
        register_step_mode("test_step_mode")(lambda *args: None)


def test_loss_scale_turns_ds_averaging_into_a_global_sample_mean():
    cfg = load_config(None, ["train.grad_accum_steps=3"])
    ctx = step_module.StepContext(cfg=cfg, optimizer=None, scheduler=None, device=torch.device("cpu"), world_size=4)
    # DeepSpeed divides by grad_accum_steps and averages over ranks: 1 / (3 * 4) x scale == 1 / samples
    assert loss_scale(ctx, 37) / (3 * 4) == pytest.approx(1 / 37)
    assert loss_scale(ctx, 0) == 0.0


def test_micro_batch_groups_pad_the_last_group_with_join_batches():
    batches = [Batch.collate([torch.ones(5)], [1], [f"id{i}"], [{}]) for i in range(5)]
    groups = list(micro_batch_groups(iter(batches), 2))
    assert [len(g) for g in groups] == [2, 2, 2]
    assert [b.ids for b in groups[-1]] == [["id4"], []] and groups[-1][1].is_empty


def test_skippable_adamw_leaves_weights_and_moments_untouched():
    weight = torch.nn.Parameter(torch.arange(4.0))
    optimizer = SkippableAdamW([weight], lr=0.1, weight_decay=0.01)
    weight.grad = torch.ones(4)
    optimizer.step()
    saved_weight, saved_state = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad = torch.full((4,), float("nan"))
    optimizer.skip_next = True
    optimizer.step()
    assert torch.equal(weight.detach(), saved_weight)
    assert all(torch.equal(optimizer.state[weight][k], v) for k, v in saved_state.items())
    optimizer.skip_next = False
    weight.grad = torch.ones(4)
    optimizer.step()
    assert not torch.equal(weight.detach(), saved_weight) and int(optimizer.state[weight]["step"]) == 2


def test_rawboost_runs_on_raw_audio_then_inputs_are_normalised():
    assert make_augment(load_config(None, [])) is None
    augment = make_augment(load_config(None, ["rawboost.enabled=true", "rawboost.algo=5"]))
    torch.manual_seed(0)
    waves = [0.1 * torch.randn(3000), 0.1 * torch.randn(2000)]  # raw audio in [-1, 1], as the loader gives
    batch = Batch.collate(waves, [1, 0], ["A-1", "B-2"], [{}, {}])
    augmented = augment(batch, 0)
    assert torch.equal(augmented.waveforms, augment(batch, 0).waveforms)  # (seed, id, epoch): SAM passes agree
    assert not torch.allclose(augmented.waveforms[0, :3000], batch.waveforms[0, :3000])
    out = model_inputs(Batch(augmented.waveforms.clone(), batch.lengths, batch.labels, batch.ids, batch.meta), EPS)
    # The order matters: LnL's non-linear terms are not scale-invariant, so augmenting normalised audio differs.
    normalised_first = model_inputs(augment(model_inputs(Batch.collate(waves, [1, 0], ["A-1", "B-2"], [{}, {}]), EPS), 0),
                                    EPS)
    assert not torch.allclose(out.waveforms, normalised_first.waveforms, atol=1e-3)
    assert out.waveforms[1, 2000:].abs().max() == 0  # padding stays zero
    valid = out.waveforms[1, :2000]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-5) and float(valid.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert augment(Batch.empty(), 0).is_empty


def test_deepspeed_config_from_the_typed_config():
    cfg = load_config(None, ["train.zero_stage=3", "train.precision=bf16", "train.grad_accum_steps=4",
                             "optim.grad_clip_norm=5.0",
                             "train.deepspeed_overrides={zero_optimization: {overlap_comm: true}, flops_profiler: {enabled: true}}"])
    config = deepspeed_config(cfg, load_universal=True)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                           "stage3_param_persistence_threshold": 0,
                                           "reduce_bucket_size": 200_000_000, "stage3_prefetch_bucket_size": 200_000_000}
    assert config["bf16"] == {"enabled": True} and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 5.0 and config["checkpoint"] == {"load_universal": True}
    assert config["flops_profiler"] == {"enabled": True}
    assert deepspeed_config(load_config(None, ["train.precision=fp32"]))["bf16"] == {"enabled": False}
