"""model.pool_over_padding: AntiDeepfake's training batches (padding unmasked, pooled) on request only."""

import pytest
import torch
from transformers import Wav2Vec2Model

from posttrain.config import ModelConfig
from posttrain.data.batch import Batch, normalize_waveforms
from posttrain.models.detector import build_detector


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(3)
    waves = [torch.randn(n, generator=generator) for n in (8000, 3200)]
    batch = Batch.collate(waves, [1, 0], [], [])
    batch.waveforms = normalize_waveforms(batch.waveforms, batch.lengths)
    return batch


@pytest.mark.parametrize("preset", ["tiny", "tiny_group_norm"])
def test_pool_over_padding_is_ads_unmasked_mean_in_training_only(preset):
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset=preset, pool_over_padding=True))
    masked = build_detector(ModelConfig(preset=preset))
    masked.load_state_dict(detector.state_dict())
    # independent reference: a stock transformers encoder with the same weights, called as AD's forward is
    # (no attention mask, stock group norm over every frame), then the mean over every frame and the head
    stock = Wav2Vec2Model(detector.encoder.config)
    stock.load_state_dict(detector.encoder.state_dict())
    batch = _batch()
    detector.train(), masked.train(), stock.train()  # the configs carry no dropout: train mode is deterministic
    with torch.no_grad():
        expected = detector.head(stock(batch.waveforms).last_hidden_state.mean(dim=1))
        torch.testing.assert_close(detector(batch.waveforms, batch.lengths), expected, atol=1e-5, rtol=1e-5)
        # the switch changes the padded row's logits (the long row has no padding: equal)
        padded_row_gap = (detector(batch.waveforms, batch.lengths) - masked(batch.waveforms, batch.lengths))[1]
        assert padded_row_gap.abs().max() > 1e-4
        detector.eval(), masked.eval()
        # validation and scoring always mask padding: the same logits as without the switch
        torch.testing.assert_close(detector(batch.waveforms, batch.lengths), masked(batch.waveforms, batch.lengths))
