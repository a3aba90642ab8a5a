import math

import pytest
import torch
from transformers import Wav2Vec2Model

from posttrain.config import ModelConfig
from posttrain.data.batch import normalize_waveforms
from posttrain.models.detector import build_detector, count_parameters
from posttrain.models.backbones import BACKBONES
from posttrain.models.presets import PRESETS, get_preset, tiny_presets

RELEASED = [name for name, preset in PRESETS.items() if preset.params_millions]


def _tolerance_millions(table_value: float) -> float:
    # The table gives sizes to 2-3 significant figures ("2.2B"): allow 1 % or the rounding step.
    half_last_digit = 0.5 * 10 ** (math.floor(math.log10(table_value)) - 1)
    return max(0.01 * table_value, half_last_digit)


@pytest.mark.parametrize("name", RELEASED)
def test_every_released_preset_has_the_table_size(name):
    preset = get_preset(name)
    with torch.device("meta"):
        detector = build_detector(ModelConfig(preset=name))
    millions = count_parameters(detector) / 1e6
    assert abs(millions - preset.params_millions) <= _tolerance_millions(preset.params_millions)
    assert detector.ssl_config.layerdrop == preset.regularisation["layerdrop"]  # AD's (0.05 for w2v small only)
    assert not detector.ssl_config.apply_spec_augment


def test_feature_extractor_kinds():
    small = get_preset("wav2vec2_small").ssl_config()
    large = get_preset("xlsr_1b").ssl_config()
    hubert = get_preset("hubert_xl").ssl_config()
    assert (small.feat_extract_norm, small.conv_bias, small.do_stable_layer_norm) == ("group", False, False)
    assert (large.feat_extract_norm, large.conv_bias, large.do_stable_layer_norm) == ("layer", True, True)
    assert (hubert.feat_extract_norm, hubert.conv_bias) == ("layer", False)


def test_unknown_preset_names_the_key():
    with pytest.raises(ValueError, match="model.preset"):
        build_detector(ModelConfig(preset="xlsr_3b"))


def _shape_family(name: str) -> tuple[str, str, bool]:
    """(architecture, conv norm, conv bias): what decides how padding could leak into a result."""
    config = get_preset(name).ssl_config()
    return get_preset(name).architecture, config.feat_extract_norm, config.conv_bias


def test_every_family_and_extractor_shape_has_a_tiny_twin_in_the_padding_test():
    """Every registered family, and every (family, conv norm, conv bias) a released preset uses, has a
    test preset, so the matrices below (read from the registries) cover it."""
    assert {PRESETS[name].architecture for name in tiny_presets()} == set(BACKBONES)
    assert {_shape_family(name) for name in PRESETS} == {_shape_family(name) for name in tiny_presets()}


@pytest.mark.parametrize("preset", tiny_presets())
def test_padding_never_reaches_the_logits(preset):
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset=preset)).eval()
    lengths = torch.tensor([8000, 5000, 3200])
    waves = [torch.randn(int(n)) for n in lengths]
    batch = torch.zeros(3, 8000)
    for row, wave in enumerate(waves):
        batch[row, : wave.numel()] = wave
    batch[1, 5000:] = 100.0  # garbage in the padding must not matter
    with torch.no_grad():
        batched = detector(batch, lengths)
        singles = torch.cat([detector(w[None], torch.tensor([w.numel()])) for w in waves])
    assert batched.shape == (3, 2)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


def test_logits_are_a_linear_head_on_the_mean_of_valid_frames():
    torch.manual_seed(1)
    detector = build_detector(ModelConfig(preset="tiny")).eval()
    wave = torch.randn(1, 6400)
    with torch.no_grad():
        hidden = detector.encoder(wave).last_hidden_state[0]  # unpadded: every frame valid
        expected = hidden.mean(dim=0) @ detector.head.weight.T + detector.head.bias
        got = detector(wave, torch.tensor([6400]))[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_pretrained_weights_load_from_a_local_directory(tmp_path):
    torch.manual_seed(2)
    source = Wav2Vec2Model(get_preset("tiny").ssl_config())
    source.save_pretrained(tmp_path / "ssl")
    detector = build_detector(ModelConfig(preset="tiny", pretrained=str(tmp_path / "ssl")))
    loaded = detector.encoder.state_dict()
    # SpecAugment is off, so its mask embedding is the one weight the detector has no use for.
    assert set(source.state_dict()) - set(loaded) == {"masked_spec_embed"}
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, source.state_dict()[name])
    assert detector.ssl_config.layerdrop == 0.0


def test_offline_and_not_cached_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="hf download"):
        build_detector(ModelConfig(preset="tiny", pretrained="facebook/wav2vec2-xls-r-2b"))


def test_normalize_waveforms_matches_per_clip_layer_norm():
    torch.manual_seed(3)
    lengths = torch.tensor([1000, 600])
    waves = torch.randn(2, 1000) * 3 + 1
    waves[1, 600:] = 0
    out = normalize_waveforms(waves, lengths)
    for row, n in enumerate(lengths.tolist()):
        reference = torch.nn.functional.layer_norm(waves[row, :n], (n,), eps=1e-7)
        torch.testing.assert_close(out[row, :n], reference, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 600:] == 0)


def test_hubert_presets_drop_the_conv_bias_the_hub_config_claims(tmp_path):
    """facebook/hubert-xlarge-ll60k's config says conv_bias: true, fairseq's HuBERT (and so the
    released detector) has none: loading the pre-trained weights follows the released model."""
    from transformers import HubertModel

    assert get_preset("hubert_xl").pretrained_overrides == {"conv_bias": False}
    torch.manual_seed(4)
    hub_like = HubertModel(get_preset("tiny_hubert").ssl_config(conv_bias=True))  # the hub's claim
    hub_like.save_pretrained(tmp_path / "ssl")
    detector = build_detector(ModelConfig(preset="tiny_hubert", pretrained=str(tmp_path / "ssl")))
    assert detector.ssl_config.conv_bias is False
    assert all(layer.conv.bias is None for layer in detector.encoder.feature_extractor.conv_layers)
    source = hub_like.state_dict()
    for name, tensor in detector.encoder.state_dict().items():
        torch.testing.assert_close(tensor, source[name])


def test_input_normalisation_eps_is_the_models_own_unless_configured(tmp_path):
    from posttrain.config import ConfigError, load_config
    from posttrain.data.batch import ANTIDEEPFAKE_INPUT_EPS, TRANSFORMERS_INPUT_EPS

    fresh = build_detector(ModelConfig(preset="tiny"))
    assert fresh.input_eps == TRANSFORMERS_INPUT_EPS
    as_antideepfake = build_detector(ModelConfig(preset="tiny", input_norm_eps=ANTIDEEPFAKE_INPUT_EPS))
    saved = as_antideepfake.ssl_config.to_dict()  # what a checkpoint keeps
    assert build_detector(ModelConfig(preset="tiny"), ssl_config=saved).input_eps == ANTIDEEPFAKE_INPUT_EPS
    waves = torch.full((1, 4000), 1e-4) * torch.sin(torch.arange(4000.0))[None]  # quiet: eps matters
    lengths = torch.tensor([4000])
    torch.testing.assert_close(as_antideepfake.normalise(waves, lengths),
                               normalize_waveforms(waves, lengths, eps=ANTIDEEPFAKE_INPUT_EPS))
    assert not torch.allclose(fresh.normalise(waves, lengths), as_antideepfake.normalise(waves, lengths), atol=1e-3)
    with pytest.raises(ConfigError, match="model.input_norm_eps"):
        load_config(None, ["model.input_norm_eps=0"])
