"""SAM building blocks in one process: global sums, the SAM/ASAM ascent against the textbook
formula (incl. chunked ASAM), and the step-mode registration. The sharded engine runs are in
tests/dist/test_sam_dist.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain.train import ascent, perturbation, sam
from posttrain.train.ascent import module_parameters
from posttrain.train.partitions import global_sums, local_dot, local_sum_of_squares


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
