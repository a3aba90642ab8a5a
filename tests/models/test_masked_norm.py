"""Masked group norm: statistics over valid frames only, so a padded batch equals batch 1 for the
group-norm family (wav2vec 2.0 small), in inference and under activation checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import ModelConfig
from posttrain.data.batch import Batch, normalize_waveforms
from posttrain.models.detector import build_detector
from posttrain.models.masked_norm import MaskedGroupNorm, first_conv_frames

LENGTHS = (8000, 5000, 3200)


def _batch(seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    waves = [torch.randn(n, generator=generator) for n in LENGTHS]
    batch = Batch.collate(waves, [1, 0, 1], [], [])
    batch.waveforms = normalize_waveforms(batch.waveforms, batch.lengths)
    return batch


def test_masked_group_norm_equals_group_norm_of_each_valid_slice():
    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    hidden = torch.randn(3, 8, 50) * 3 + 2
    frames = torch.tensor([50, 31, 7])
    norm.valid_frames = frames
    out = norm(hidden)
    for row, count in enumerate(frames.tolist()):
        # independent reference: the stock kernel on the row's valid frames alone
        expected = F.group_norm(hidden[row:row + 1, :, :count], 4, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(out[row:row + 1, :, :count], expected, atol=1e-5, rtol=1e-5)


def test_masked_group_norm_refuses_lengths_of_another_batch():
    norm = MaskedGroupNorm(2, 2)
    norm.valid_frames = torch.tensor([3, 2])
    with pytest.raises(RuntimeError, match="Detector.embed"):
        norm(torch.randn(3, 2, 5))


def test_group_norm_extractor_is_masked_and_keeps_its_state_dict_keys():
    detector = build_detector(ModelConfig(preset="tiny_group_norm"))
    norm = detector.encoder.feature_extractor.conv_layers[0].layer_norm
    assert isinstance(norm, MaskedGroupNorm)
    keys = set(detector.state_dict())
    assert "encoder.feature_extractor.conv_layers.0.layer_norm.weight" in keys
    assert not any(key.startswith("_group_norm") for key in keys)
    assert build_detector(ModelConfig(preset="tiny"))._group_norm == (None,)  # layer norm: per frame already


def test_stock_group_norm_would_let_padding_change_the_logits():
    """The failure the mask fixes, measured on the same batch (so the padding test above can fail)."""
    torch.manual_seed(1)
    detector = build_detector(ModelConfig(preset="tiny_group_norm")).eval()
    batch = _batch(1)
    first = detector.encoder.feature_extractor.conv_layers[0]
    masked = first.layer_norm
    with torch.no_grad():
        singles = torch.cat([detector(batch.waveforms[row:row + 1, :n], batch.lengths[row:row + 1])
                             for row, n in enumerate(LENGTHS)])
        fixed = detector(batch.waveforms, batch.lengths)
        stock = nn.GroupNorm(masked.num_groups, masked.num_channels)
        stock.weight, stock.bias = masked.weight, masked.bias
        first.layer_norm = stock
        leaky = detector(batch.waveforms, batch.lengths)
    assert (leaky - singles).abs().max() > 1e-3
    torch.testing.assert_close(fixed, singles, atol=1e-5, rtol=1e-5)


def test_padded_training_step_with_activation_checkpointing_matches_batch_one():
    """The recomputed group norm (backward under checkpointing) uses the same valid frames: the
    gradient of a padded batch equals the sum of the per-file gradients."""
    torch.manual_seed(2)
    detector = build_detector(ModelConfig(preset="tiny_group_norm", gradient_checkpointing=True)).train()
    batch = _batch(2)

    def gradients(waveforms: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        detector.zero_grad()
        F.cross_entropy(detector(waveforms, lengths), labels, reduction="sum").backward()
        return [p.grad.clone() for p in detector.parameters()]

    padded = gradients(batch.waveforms, batch.lengths, batch.labels)
    per_file = [gradients(batch.waveforms[row:row + 1, :n], batch.lengths[row:row + 1], batch.labels[row:row + 1])
                for row, n in enumerate(LENGTHS)]
    for got, *parts in zip(padded, *per_file):
        torch.testing.assert_close(got, sum(parts), atol=1e-4, rtol=1e-4)


def test_first_conv_frames_follow_the_conv_arithmetic():
    detector = build_detector(ModelConfig(preset="tiny_group_norm"))
    conv = detector.encoder.feature_extractor.conv_layers[0].conv
    lengths = torch.tensor([8000, 10, 9, 0])
    expected = [conv(torch.zeros(1, 1, n)).shape[-1] if n >= 10 else 0 for n in lengths.tolist()]
    assert first_conv_frames(detector.encoder, lengths).tolist() == expected


def test_traceable_group_norm_always_takes_the_masked_path_and_equals_the_stock_kernel_unpadded():
    """While an exporter traces (ONNX), the all-valid fast path (a data-dependent branch) is off: the masked
    statistics of an unpadded batch equal the stock kernel's, and padded rows keep their own statistics."""
    from posttrain.models.masked_norm import traceable_group_norm

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset="tiny_group_norm")).eval()
    norm = detector.encoder.feature_extractor.conv_layers[0].layer_norm
    hidden = torch.randn(2, norm.num_channels, 40)
    norm.valid_frames = torch.tensor([40, 40])
    stock = norm(hidden)
    with traceable_group_norm(detector.encoder):
        assert norm.traceable
        traced = norm(hidden)
        norm.valid_frames = torch.tensor([40, 25])
        padded = norm(hidden)
    assert not norm.traceable
    torch.testing.assert_close(traced, stock, atol=1e-5, rtol=1e-5)
    expected = F.group_norm(hidden[1:, :, :25], norm.num_groups, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(padded[1:, :, :25], expected, atol=1e-5, rtol=1e-5)
