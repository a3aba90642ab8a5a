"""AntiDeepfake's encoder regularisation as the presets' defaults (its models/W2V_configs.py, written out
here by hand), the LayerDrop conflicts, feature-gradient scaling and rank-synchronised LayerDrop."""

import pytest
import torch

from posttrain.config import ConfigError, ModelConfig, load_config
from posttrain.models.detector import build_detector

# (fairseq dropout, attention_dropout, activation_dropout, dropout_input, encoder_layerdrop, feature_grad_mult)
# as AD's W2V_configs.py / HBT_configs.py give them (w2v_small: dropout and attention_dropout unset, i.e.
# fairseq's default 0.1); xlsr_300m is not among AD's backbones.
AD_VALUES = {
    "wav2vec2_small": (0.1, 0.1, 0.0, 0.1, 0.05, 0.1),
    "wav2vec2_large": (0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    "mms_300m": (0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    "xlsr_300m": (0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    "mms_1b": (0.0, 0.0, 0.0, 0.1, 0.0, 1.0),
    "xlsr_1b": (0.0, 0.0, 0.0, 0.1, 0.0, 1.0),
    "xlsr_2b": (0.0, 0.0, 0.0, 0.1, 0.0, 1.0),
    "hubert_xl": (0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
}


def _hf_values(detector):
    config = detector.ssl_config
    return (config.hidden_dropout, config.attention_dropout, config.activation_dropout, config.feat_proj_dropout,
            config.layerdrop)


@pytest.mark.parametrize("preset", sorted(AD_VALUES))
def test_presets_default_to_antideepfakes_regularisation(preset):
    with torch.device("meta"):
        detector = build_detector(ModelConfig(preset=preset))
    assert _hf_values(detector) == AD_VALUES[preset][:5]
    hooks = detector.encoder.feature_extractor._forward_hooks
    assert len(hooks) == (AD_VALUES[preset][5] != 1.0)  # the feature-gradient scaling hook


def test_explicit_values_win_and_layerdrop_conflicts_are_named():
    with torch.device("meta"):
        detector = build_detector(ModelConfig(preset="wav2vec2_small", hidden_dropout=0.0, layerdrop=0.2))
        assert _hf_values(detector) == (0.0, 0.1, 0.0, 0.1, 0.2)
        # the preset's LayerDrop is off where it conflicts; its other values stay
        detector = build_detector(ModelConfig(preset="wav2vec2_small"), layerdrop_conflicts=["sam.enabled"])
        assert _hf_values(detector) == (0.1, 0.1, 0.0, 0.1, 0.0)
    for conflict, keys in (("sam.enabled=true", "sam.enabled"), ("train.zero_stage=3", "train.zero_stage=3"),
                           ("model.gradient_checkpointing=true", "model.gradient_checkpointing")):
        with pytest.raises(ConfigError, match=rf"^model\.layerdrop: LayerDrop cannot be combined with {keys}"):
            load_config(None, ["model.preset=wav2vec2_small", "model.layerdrop=0.05", conflict])
        load_config(None, ["model.preset=wav2vec2_small", conflict])  # the preset's default: turned off, no error


def test_feature_grad_mult_scales_only_the_gradient_into_the_feature_extractor():
    torch.manual_seed(0)
    scaled = build_detector(ModelConfig(preset="tiny", feature_grad_mult=0.1)).train()
    plain = build_detector(ModelConfig(preset="tiny")).train()
    plain.load_state_dict(scaled.state_dict())
    waves, lengths = torch.randn(2, 4000), torch.tensor([4000, 3000])
    outputs = []
    for model in (scaled, plain):
        logits = model(waves, lengths)
        logits.sum().backward()
        outputs.append(logits.detach())
    torch.testing.assert_close(outputs[0], outputs[1])  # forward unchanged
    for (name, param), (_, reference) in zip(scaled.named_parameters(), plain.named_parameters()):
        factor = 0.1 if name.startswith("encoder.feature_extractor.") else 1.0
        torch.testing.assert_close(param.grad, reference.grad * factor, atol=1e-7, rtol=1e-5, msg=name)


def test_layerdrop_skips_the_same_layers_on_every_rank():
    torch.manual_seed(0)
    model = build_detector(ModelConfig(preset="tiny", layerdrop=0.5), layerdrop_seed=7).train()
    ran: list[int] = []
    for index, layer in enumerate(model.encoder.encoder.layers):
        layer.register_forward_hook(lambda module, inputs, output, index=index: ran.append(index))
    waves, lengths = torch.randn(1, 4000), torch.tensor([4000])

    def rank_run(rank_seed: int) -> list[list[int]]:
        """Four training forwards of a fresh replica whose own generator is seeded per rank."""
        model.layerdrop_sync.forwards = 0
        torch.manual_seed(rank_seed)
        runs = []
        for _ in range(4):
            ran.clear()
            state = torch.get_rng_state()
            with torch.no_grad():
                model(waves, lengths)
            assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
            runs.append(list(ran))
        return runs

    rank0, rank1 = rank_run(1234 + 1000), rank_run(1234 + 2000)
    assert rank0 == rank1
    assert len({tuple(run) for run in rank0}) > 1  # the choice changes from forward to forward
