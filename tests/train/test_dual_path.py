"""Dual-path (DPDA) step-mode pieces in one process: the two paths' inputs, the in-place alignment of
gradient partitions, the checkpointed conflict counts and EMA state, and the registration. The full
step inside sharded DeepSpeed engines is checked against textbook PCGrad / GradVac / CAGrad in
tests/dist/test_dual_path_dist.py."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from posttrain.augment.rawboost import RawBoost
from posttrain.config import ConfigError, load_config
from posttrain.data.batch import Batch, normalize_waveforms
from posttrain.train import dual_path
from posttrain.optim.partitions import flat_copy
from posttrain.train.step import StepContext, get_step_mode


def _ctx(*overrides: str, state: dict | None = None, epoch: int = 0) -> StepContext:
    cfg = load_config(None, ["dual_path.enabled=true", *overrides])
    return StepContext(cfg=cfg, optimizer=None, scheduler=None, device=torch.device("cpu"), world_size=1,
                       epoch=epoch, state=state if state is not None else {})


def _raw_batch(lengths=(4000, 3200, 4000)) -> Batch:
    generator = torch.Generator().manual_seed(3)
    waves = [0.3 * torch.randn(n, generator=generator) for n in lengths]
    return Batch.collate(waves, [i % 2 for i in range(len(lengths))], [f"LJ-x{i}" for i in range(len(lengths))],
                         [{} for _ in lengths])


def test_dual_path_registers_from_its_own_module():
    from posttrain.config import DualPathConfig

    assert DualPathConfig.STEP_MODE.module == "posttrain.train.dual_path" and DualPathConfig.STEP_MODE.edits_partitions
    assert get_step_mode("dual_path") is dual_path.dual_path_step


def test_sam_with_dual_path_is_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="dual_path.enabled.*sam"):
        load_config(None, ["dual_path.enabled=true", "sam.enabled=true"])


def test_clean_path_is_untouched_and_augmented_path_is_rawboost_algo_4_per_sample():
    ctx = _ctx(epoch=2)
    raw = _raw_batch()
    before = raw.waveforms.clone()
    clean, augmented = dual_path.dual_inputs(ctx, [raw, Batch.empty()], dual_path.path_augment(ctx))
    assert torch.equal(raw.waveforms, before)  # the loader's batch is not modified
    assert torch.allclose(clean[0].waveforms, normalize_waveforms(before, raw.lengths))
    assert clean[1].is_empty and augmented[1].is_empty
    rawboost = RawBoost(ctx.cfg.rawboost, algo=4)
    for row, (sample_id, length) in enumerate(zip(raw.ids, raw.lengths.tolist())):
        # one sample alone: its draws depend on (seed, id, epoch) only, not on the batch it is in
        alone = rawboost(Batch(before[row: row + 1, :length], raw.lengths[row: row + 1], raw.labels[row: row + 1],
                               [sample_id]), epoch=2)
        want = normalize_waveforms(alone.waveforms, alone.lengths)[0]
        assert torch.allclose(augmented[0].waveforms[row, :length], want, atol=1e-5), sample_id
        assert not torch.allclose(augmented[0].waveforms[row, :length], clean[0].waveforms[row, :length], atol=1e-2)
    _, next_epoch = dual_path.dual_inputs(_ctx(epoch=3), [raw], dual_path.path_augment(ctx))
    assert not torch.allclose(next_epoch[0].waveforms, augmented[0].waveforms, atol=1e-3)


def test_augmented_path_draws_per_read_so_repeats_differ():
    ctx = _ctx(epoch=1)
    one = _raw_batch(lengths=(4000,))
    twice = Batch(one.waveforms.repeat(2, 1), one.lengths.repeat(2), one.labels.repeat(2), one.ids * 2,
                  one.meta * 2, repeats=[0, 1])
    clean, augmented = dual_path.dual_inputs(ctx, [twice], dual_path.path_augment(ctx))
    assert torch.equal(clean[0].waveforms[0], clean[0].waveforms[1])
    assert (augmented[0].waveforms[0] - augmented[0].waveforms[1]).abs().max() > 1e-2


def _pcgrad_textbook(g_c: torch.Tensor, g_a: torch.Tensor) -> torch.Tensor:
    dot = g_c @ g_a
    if dot < 0:
        g_c, g_a = g_c - dot / (g_a @ g_a) * g_a, g_a - dot / (g_c @ g_c) * g_c
    return (g_c + g_a) / 2


@pytest.mark.parametrize("sign", [1.0, -1.0])  # agreeing, then conflicting gradients
def test_partitions_are_combined_in_place_over_the_whole_flattened_gradient(sign):
    generator = torch.Generator().manual_seed(0)
    shapes = [7, 12, 3]
    clean = [torch.randn(n, generator=generator) for n in shapes]
    # the augmented gradient: mostly (+/-) the clean one, plus noise
    augmented = [sign * c + 0.5 * torch.randn(c.shape, generator=generator) for c in clean]
    flat_c, flat_a = torch.cat(clean).double(), torch.cat(augmented).double()
    ctx = _ctx()
    tracker = dual_path.ConflictTracker(ctx)
    buffers = [a.clone() for a in augmented]
    stats = dual_path.align_partitions_(clean, buffers, None, tracker, ctx.device)
    assert stats.conflict == (sign < 0) and stats.adjusted == (sign < 0)
    assert stats.cosine == pytest.approx(float(flat_c @ flat_a / (flat_c.norm() * flat_a.norm())), rel=1e-6)
    assert torch.allclose(torch.cat(buffers).double(), _pcgrad_textbook(flat_c, flat_a), atol=1e-6)
    assert ctx.state["dual_path"]["conflicts"] == int(sign < 0)


def test_non_finite_products_leave_buffers_counts_and_ema_alone():
    ctx = _ctx("dual_path.method=gradvac")
    tracker = dual_path.ConflictTracker(ctx)
    clean = [torch.ones(4)]
    buffers = [torch.tensor([1.0, float("nan"), 2.0, 3.0])]
    assert dual_path.align_partitions_(clean, buffers, None, tracker, ctx.device) is None
    assert torch.isnan(buffers[0][1]) and buffers[0][0] == 1.0
    assert ctx.state == {} and tracker.aligner.target_cosine == 0.0
    extra = dual_path.step_extras(None, tracker)
    assert math.isnan(extra["dual_path/cosine"]) and math.isnan(extra["dual_path/conflict_rate"])


def test_running_counts_and_gradvac_target_survive_a_json_round_trip(caplog):
    ctx = _ctx("dual_path.method=gradvac")
    tracker = dual_path.ConflictTracker(ctx)
    for sign in (1.0, -1.0, 1.0, 1.0):  # one conflicting step in four
        g = torch.tensor([1.0, 2.0, -1.0])
        dual_path.align_partitions_([g], [sign * g + torch.tensor([0.5, -0.3, 0.2])], None, tracker, ctx.device)
    assert tracker.conflict_rate == 0.25 and tracker.aligner.target_cosine > 0
    extra = dual_path.step_extras(None, tracker)
    assert extra["dual_path/conflict_rate"] == 0.25 and extra["dual_path/aligned_steps"] == 4.0

    resumed = dual_path.ConflictTracker(_ctx("dual_path.method=gradvac", state=json.loads(json.dumps(ctx.state))))
    assert (resumed.aligned_steps, resumed.conflicts) == (4, 1)
    assert resumed.aligner.state_dict() == tracker.aligner.state_dict()
    with caplog.at_level(logging.WARNING):
        switched = dual_path.ConflictTracker(_ctx("dual_path.method=pcgrad", state=json.loads(json.dumps(ctx.state))))
    assert switched.aligner.method == "pcgrad" and switched.conflicts == 1 and "afresh" in caplog.text


def test_gradient_copy_is_one_flat_buffer_independent_of_the_source():
    grads = [torch.arange(5.0), torch.arange(3.0) + 10]
    copies = flat_copy(grads)
    torch._foreach_zero_(grads)
    assert [c.tolist() for c in copies] == [[0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 11.0, 12.0]]
    assert copies[1].untyped_storage().data_ptr() == copies[0].untyped_storage().data_ptr()
    assert flat_copy([]) == []
    # reused when the sizes match (LookSAM's stored direction), in the asked dtype
    again = flat_copy([torch.ones(5, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)], into=copies)
    assert again is copies and copies[0].dtype == torch.float32 and copies[1].tolist() == [1.0, 1.0, 1.0]
    assert flat_copy(grads, torch.float64)[0].dtype == torch.float64
