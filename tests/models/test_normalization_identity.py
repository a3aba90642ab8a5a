"""A model is scored with the waveform normalisation it was trained with: ``model.normalization`` travels
with the detector, its export and its reload, and inference applies it."""

from __future__ import annotations

import numpy as np
import torch

from posttrain.config import ModelConfig, NormalizationConfig
from posttrain.eval.inference import forward_windows
from posttrain.hub.export import export_detector, identity_document, load_export
from posttrain.models.detector import build_detector


def test_normalisation_travels_through_export_and_inference(tmp_path):
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset="tiny", normalization=NormalizationConfig(eps=0.5))).eval()
    identity = identity_document(detector, preset="tiny")
    assert identity["normalization"] == {"eps": 0.5}
    export_detector(detector, tmp_path / "model", identity, "card\n")
    loaded, loaded_identity = load_export(tmp_path / "model")
    assert loaded.normalization == NormalizationConfig(eps=0.5) and loaded_identity["normalization"] == {"eps": 0.5}

    wave = (0.05 * np.random.default_rng(0).standard_normal(4000)).astype(np.float32)  # quiet: eps matters
    logits, _ = forward_windows(loaded, [wave], torch.device("cpu"))
    x = torch.from_numpy(wave)[None].double()
    lengths = torch.tensor([wave.size])
    with torch.no_grad():  # the reference normalises by hand: (x - mean) / sqrt(var + eps)
        by_hand = lambda eps: detector(((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + eps)).float(), lengths)
        trained, default = by_hand(0.5), by_hand(1e-7)
    np.testing.assert_allclose(logits, trained.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits, default.numpy(), rtol=1e-3, atol=1e-3)
