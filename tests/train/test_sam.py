"""SAM building blocks in one process: global sums, the SAM/ASAM ascent against the textbook
formula (incl. chunked ASAM), and the step-mode registration. The sharded engine runs are in
tests/dist/test_sam_dist.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain.optim import ascent
from posttrain.train import perturbation, sam
from posttrain.optim.ascent import module_parameters
from posttrain.dist import global_sums
from posttrain.optim.partitions import local_dot, local_sum_of_squares


def _model_with_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    model(torch.randn(4, 6)).square().sum().backward()
    return model


def test_global_sums_without_group_are_the_local_values():
    tensors = [torch.randn(7), torch.randn(3, dtype=torch.bfloat16), torch.randn(2, 2).view(-1)]
    expected = sum(float(t.double().square().sum()) for t in tensors)
    assert float(global_sums(local_sum_of_squares(tensors), None)) == pytest.approx(expected, rel=1e-6)
    assert float(local_dot(tensors, tensors)) == pytest.approx(expected, rel=1e-6)
    assert float(global_sums(local_sum_of_squares([]), None)) == 0.0


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("chunk_numel", [1 << 24, 8])  # 8: ASAM's |w| + eta built over several chunks
def test_ascent_direction_is_the_textbook_one(adaptive, chunk_numel, monkeypatch):
    monkeypatch.setattr(ascent, "CHUNK_NUMEL", chunk_numel)
    model = _model_with_grads()
    named = dict(model.named_parameters())
    grads = {n: p.grad.clone() for n, p in named.items()}
    t = {n: (p.detach().abs() + 0.01) if "weight" in n else torch.ones_like(p) for n, p in named.items()}
    if not adaptive:
        t = {n: torch.ones_like(p) for n, p in named.items()}
    norm = torch.sqrt(sum(((t[n] * g) ** 2).sum() for n, g in grads.items()))

    owned, owned_grads = module_parameters(model)
    got = ascent.ascent_direction_(owned, owned_grads, adaptive=adaptive, eta=0.01, device=torch.device("cpu"))
    assert got == pytest.approx(float(norm), rel=1e-6)
    for name, direction in zip(owned.names, owned_grads):
        assert torch.allclose(direction, (t[name] ** 2 * grads[name]).view(-1), rtol=1e-6, atol=1e-8), name


def test_sam_registers_as_a_step_mode_and_guards_checkpoints():
    from posttrain.train.step import get_step_mode

    assert get_step_mode("sam") is sam.sam_step
    engine = nn.Linear(2, 2)  # any object stands for an engine in the flag set
    perturbation.assert_not_perturbed(engine)
    perturbation.mark_perturbed(engine, "sam")
    with pytest.raises(perturbation.PerturbedWeightsError, match="sam: cannot save: the weights are perturbed"):
        perturbation.assert_not_perturbed(engine, "save")
    perturbation.clear_perturbed(engine)
    perturbation.assert_not_perturbed(engine)


def test_esam_weight_mask_is_bernoulli_and_the_same_however_a_parameter_is_sliced():
    from posttrain.train.sam import _mask_key, keep_mask

    key = _mask_key(1234, 7, "encoder.layers.0.fc1.weight")
    whole = keep_mask(key, 0, 200_000, 0.3, torch.device("cpu"))
    assert float(whole.double().mean()) == pytest.approx(0.3, abs=0.005)
    # ZeRO slices of one parameter (any offsets) compose to the whole parameter's mask
    cuts = [0, 12_345, 100_000, 200_000]
    pieces = [keep_mask(key, a, b - a, 0.3, torch.device("cpu")) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    # another step or parameter draws an independent mask: overlap ~ 0.3^2, neighbours uncorrelated
    other = keep_mask(_mask_key(1234, 8, "encoder.layers.0.fc1.weight"), 0, 200_000, 0.3, torch.device("cpu"))
    assert float((whole & other).double().mean()) == pytest.approx(0.09, abs=0.005)
    assert float((whole[1:] & whole[:-1]).double().mean()) == pytest.approx(0.09, abs=0.005)


def test_esam_mask_of_ranks_partitions_tiles_the_whole_parameters_mask():
    """``stochastic_weight_mask_`` on two ranks' ZeRO partitions of one parameter (each with its offset)
    equals the mask of the whole parameter on one rank: a partition masked as if it started at 0 (the
    offset ignored) would draw the other rank's elements again."""
    from posttrain.optim.partitions import OwnedParameters
    from posttrain.train.sam import stochastic_weight_mask_

    numel, cut = 50_000, 20_011
    whole = [torch.ones(numel)]
    stochastic_weight_mask_(OwnedParameters(2, ["w"], whole, whole, None), whole, 0.4, seed=3, step_index=5)
    parts = [torch.ones(cut), torch.ones(numel - cut)]
    for part, offset in zip(parts, (0, cut)):
        owned = OwnedParameters(2, ["w"], [part], [part], None, offsets=[offset])
        stochastic_weight_mask_(owned, [part], 0.4, seed=3, step_index=5)
    torch.testing.assert_close(torch.cat(parts), whole[0], rtol=0, atol=0)
    assert 0.35 < float((whole[0] > 0).double().mean()) < 0.45 and float(whole[0].max()) == pytest.approx(2.5)


def test_esam_keeps_the_sharpest_samples_of_the_global_step_in_order():
    from posttrain.data.batch import Batch
    from posttrain.train.sam import rows_of, select_sharpest

    increases = [torch.tensor([0.1, 0.5, 0.2]), torch.tensor([]), torch.tensor([0.5, -1.0])]
    rows, count = select_sharpest(increases, 0.5)  # ceil(0.5 x 5) = 3: 0.5, 0.5 (the earlier first), 0.2
    assert count == 3 and [r.tolist() for r in rows] == [[1, 2], [], [0]]
    batch = Batch(torch.arange(12.0).view(3, 4), torch.tensor([4, 2, 3]), torch.tensor([1, 0, 1]), ["a", "b", "c"],
                  [{}, {}, {}], [0, 1, 0])
    picked = rows_of(batch, torch.tensor([1, 2]))
    assert picked.ids == ["b", "c"] and picked.repeats == [1, 0] and picked.waveforms.shape == (2, 3)
    assert rows_of(batch, torch.tensor([], dtype=torch.long)).is_empty
