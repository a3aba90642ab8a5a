"""posttrain's OC-softmax head against AntiDeepfake's own ``OCAngleLayer`` / ``OCSoftmaxLoss`` (goldens in
tests/fixtures/ad_grpo, made by running AD's models/oc_softmax.py at 0dea622): initial weights from the
same seed, the angle-only scores, the loss and its gradients w.r.t. the input and the weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.models.oc_softmax import OCSoftmaxHead

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ad_grpo"
INDEX = json.loads((FIXTURES / "oc_softmax_cases.json").read_text(encoding="utf-8"))
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


@pytest.fixture(scope="module")
def tensors():
    return load_file(FIXTURES / "oc_softmax_cases.safetensors")


def _scaled_error(got, golden) -> float:
    got, golden = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(golden, dtype=torch.float64)
    return float((got - golden).abs().max() / max(1.0, float(golden.abs().max())))


@pytest.mark.parametrize("case", INDEX["cases"], ids=[case["key"] for case in INDEX["cases"]])
def test_scores_loss_and_gradients_equal_antideepfakes(case, tensors):
    t = {name.removeprefix(case["key"] + "."): tensors[name] for name in case["tensors"]}
    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(case["layer_seed"])
    head = OCSoftmaxHead(case["input_features"])
    assert torch.equal(head.weight.detach().to(dtype), t["weight"])  # same seed, same initial weight
    head = head.to(dtype)
    pooled = t["input"].clone().requires_grad_(True)
    outputs = head(pooled)
    assert _scaled_error(outputs.detach(), t["angle_only"]) <= TOLERANCE[case["dtype"]]
    loss = head.sample_losses(outputs, t["target"]).mean()
    loss.backward()
    assert _scaled_error(loss.detach(), case["loss"]) <= TOLERANCE[case["dtype"]]
    assert _scaled_error(pooled.grad, t["grad_input"]) <= TOLERANCE[case["dtype"]]
    assert _scaled_error(head.weight.grad, t["grad_weight"]) <= TOLERANCE[case["dtype"]]


def test_the_detector_takes_its_loss_and_score_from_its_head():
    """Linear: cross-entropy and real-minus-fake, exactly as before; OC: [-cos, cos], its loss, the cosine."""
    import numpy as np
    import torch.nn.functional as F

    from posttrain.config import ModelConfig
    from posttrain.data.batch import Batch
    from posttrain.eval.sharpness import _training_loss
    from posttrain.models.detector import build_detector

    generator = torch.Generator().manual_seed(0)
    waves, lengths = torch.randn(3, 6000, generator=generator), torch.tensor([6000, 5000, 4000])
    labels = torch.tensor([1, 0, 1])
    torch.manual_seed(0)
    linear = build_detector(ModelConfig(preset="tiny")).eval()
    with torch.no_grad():
        logits = linear(waves, lengths)
    assert torch.equal(linear.sample_losses(logits, labels), F.cross_entropy(logits.float(), labels, reduction="none"))
    assert linear.score_definition.name == "logit_diff" and linear.head_settings == {"head": "linear"}
    logit_diff = (logits.double()[:, 1] - logits.double()[:, 0]).numpy()
    np.testing.assert_array_equal(linear.score_definition.scores(logits.numpy()), logit_diff)

    oc = build_detector(ModelConfig(preset="tiny", head="oc_softmax", oc_margin_real=0.7, oc_margin_fake=0.1,
                                    oc_scale=5.0)).eval()
    assert isinstance(oc.head, OCSoftmaxHead) and oc.head.weight.shape == (oc.ssl_config.hidden_size, 1)
    with torch.no_grad():
        pooled, outputs = oc.embed(waves, lengths).double(), oc(waves, lengths)
    weight = oc.head.weight.detach().double()[:, 0]
    cos = pooled @ weight / (pooled.norm(dim=1) * weight.norm())
    torch.testing.assert_close(outputs.double(), torch.stack([-cos, cos], dim=1), atol=1e-6, rtol=1e-6)
    expected = torch.where(labels.bool(), F.softplus(5.0 * (0.7 - cos)), F.softplus(5.0 * (cos - 0.1)))
    torch.testing.assert_close(oc.sample_losses(outputs, labels).double(), expected, atol=1e-5, rtol=1e-5)
    definition = oc.score_definition
    assert (definition.name, definition.logits, definition.threshold) == ("cosine", False, pytest.approx(0.4))
    np.testing.assert_allclose(definition.scores(outputs.numpy()), cos.numpy(), atol=1e-6)
    with torch.no_grad():  # sharpness measures the training loss: the head's
        loss = _training_loss(oc, Batch(waves, lengths, labels), torch.device("cpu"))()
    assert float(loss) == pytest.approx(float(expected.mean()), rel=1e-5)
