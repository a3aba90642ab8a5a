"""posttrain's GRPO objective against AntiDeepfake's own ``grpo2_loss`` / ``grpo3_loss`` (the goldens in
tests/fixtures/ad_grpo, made by running AD's algo/rl.py at 0dea622): the loss and its gradient w.r.t. the
policy's logits, every case, float64 and float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.train.grpo_loss import advantages, grpo_loss, grpo_terms, sample_labels

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ad_grpo"
CASES = json.loads((FIXTURES / "grpo_cases.json").read_text(encoding="utf-8"))["cases"]
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}  # max |diff| / max(1, max |golden|)


@pytest.fixture(scope="module")
def tensors():
    return load_file(FIXTURES / "grpo_cases.safetensors")


def _scaled_error(got, golden) -> float:
    got, golden = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(golden, dtype=torch.float64)
    return float((got - golden).abs().max() / max(1.0, float(golden.abs().max())))


@pytest.mark.parametrize("case", CASES, ids=[case["key"] for case in CASES])
def test_loss_and_gradient_equal_antideepfakes(case, tensors):
    t = {name.removeprefix(case["key"] + "."): tensors[name] for name in case["tensors"]}
    logits = t["logits"].clone().requires_grad_(True)
    rl = case["rl_config"]
    loss = grpo_loss(logits, t["logits_ref"], t.get("logits_old"), t["sa_labels"], t["gt_labels"],
                     beta=rl.get("beta", 1.0), epsilon=rl.get("epsilon", 0.2), std_floor=rl["std_floor"])
    loss.backward()
    assert _scaled_error(loss.detach(), case["loss"]) <= TOLERANCE[case["dtype"]]
    assert _scaled_error(logits.grad, t["grad_logits"]) <= TOLERANCE[case["dtype"]]


def test_clip_fraction_counts_the_clipped_branch(tensors):
    case = next(c for c in CASES if c["key"] == "grpo3.clipped.float64")
    t = {name.removeprefix(case["key"] + "."): tensors[name] for name in case["tensors"]}
    terms = grpo_terms(t["logits"], t["logits_ref"], t["logits_old"], t["sa_labels"], t["gt_labels"],
                       beta=0.04, epsilon=0.2, std_floor=1e-5)
    assert int(terms.clipped.sum()) == case["stats"]["n_clipped_active"]


def test_group_normalisation_is_per_utterance():
    reward = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    per_group = advantages(reward, 1e-5, "group")
    for row, got in zip(reward, per_group):
        assert torch.allclose(got, (row - row.mean()) / (row.std() + 1e-5))
    per_batch = advantages(reward, 1e-5, "batch")
    assert torch.allclose(per_batch, (reward - reward.mean()) / (reward.std() + 1e-5))


def test_sampling_is_reproducible_from_the_generator_and_follows_the_softmax():
    logits = torch.tensor([[2.0, -1.0], [-3.0, 3.0]])
    draw = lambda seed: sample_labels(logits, 4096, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))
    frequency = draw(7).float().mean(dim=1)  # share of label 1 per row
    expected = torch.softmax(logits, dim=-1)[:, 1]
    assert torch.allclose(frequency, expected, atol=0.02)
