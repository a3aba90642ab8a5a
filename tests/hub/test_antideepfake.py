"""Released AntiDeepfake checkpoints (fairseq layout) convert to posttrain detectors without fairseq.

The releases are laid out in the test by ``conftest.fairseq_release_state``, a transformers -> fairseq
mapping written independently of the converter, from weights that are all distinct (so a swapped
pair of layer norms or biases cannot go unnoticed).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import fairseq_release_state, random_detector
from safetensors.torch import save_file

from posttrain.config import ModelConfig
from posttrain.hub.antideepfake import (LICENSE, ConversionError, choose_preset, convert_checkpoint,
                                        read_state_dict, released_checkpoints, to_detector_state)
from posttrain.models.backbones import BACKBONES, get_backbone
from posttrain.models.detector import build_detector
from posttrain.models.presets import PRESETS, tiny_presets

# the test presets of the families whose fairseq checkpoints posttrain converts
CONVERTIBLE = [name for name in tiny_presets() if get_backbone(PRESETS[name].architecture).fairseq_convertible]
PRETRAINING_MODULES = {"mask_emb", "final_proj", "quantizer", "project_q", "label_embs_concat"}


def padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8000, 5200, 3300])
    waves = torch.randn(3, 8000, generator=generator)
    waves[torch.arange(8000)[None, :] >= lengths[:, None]] = 0.0
    return waves, lengths


def write_release(detector, folder, state=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else fairseq_release_state(detector), folder / "model.safetensors")
    return folder / "model.safetensors"


@pytest.mark.parametrize("preset", CONVERTIBLE)
def test_release_converts_exactly_with_every_key_accounted_for(preset, tmp_path):
    reference = random_detector(preset)
    state = fairseq_release_state(reference)
    write_release(reference, tmp_path, state)

    detector, identity = convert_checkpoint(tmp_path)  # the folder of a hub snapshot

    assert identity["preset"] == preset and identity["license"] == LICENSE
    expected_ignored = sorted(key for key in state
                              if key.removeprefix("m_ssl.model.").split(".")[0] in PRETRAINING_MODULES)
    assert identity["source"]["ignored_pretraining_keys"] == expected_ignored
    converted, original = detector.state_dict(), reference.state_dict()
    assert set(converted) == set(original)
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), key
    waves, lengths = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(detector(waves, lengths), reference(waves, lengths), rtol=0, atol=0)


def test_speechbrain_ckpt_converts_like_the_safetensors_file(tmp_path):
    reference = random_detector("tiny_group_norm", seed=1)
    torch.save(fairseq_release_state(reference), tmp_path / "model.ckpt")
    detector, identity = convert_checkpoint(tmp_path / "model.ckpt")
    waves, lengths = padded_batch(1)
    with torch.no_grad():
        assert torch.equal(detector(waves, lengths), reference(waves, lengths))
    assert identity["source"]["path"].endswith("model.ckpt")


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"m_ssl.model.mask_emb": torch.zeros(4), "payload": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ConversionError, match=r"evil\.ckpt: a legacy pickle checkpoint that needs code "
                                              r"\((posix|os)\.mkdir\)") as refused:
        convert_checkpoint(tmp_path / "evil.ckpt")
    assert "weights_only=False" not in str(refused.value)  # never torch's advice to run the code
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.is_dir()


@pytest.mark.parametrize("action, key", [
    ("extra", "m_ssl.model.encoder.adapter.weight"),
    ("extra", "classifier.weight"),
    ("drop", "m_ssl.model.encoder.layers.1.fc2.bias"),
    ("drop", "proj_fc.bias"),
    ("drop", "m_ssl.model.encoder.pos_conv.0.weight_g"),
])
def test_unknown_and_missing_keys_are_named(action, key, tmp_path):
    reference = random_detector("tiny")
    state = fairseq_release_state(reference)
    if action == "extra":
        state[key] = torch.zeros(3)
        message = f"unknown key '{re.escape(key)}'"
    else:
        del state[key]
        message = f"missing required key.*{re.escape(key)}"
    path = write_release(reference, tmp_path, state)
    with pytest.raises(ConversionError, match=message) as error:
        convert_checkpoint(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("preset", sorted(set(released_checkpoints().values())))
def test_every_released_architecture_is_recognised_from_its_tensor_shapes(preset):
    """Full-size layouts, on the meta device (shapes without memory): every key maps, the preset is found."""
    with torch.device("meta"):
        detector = build_detector(ModelConfig(preset=preset))
    shape, state, _ = to_detector_state(fairseq_release_state(detector))
    assert set(state) == set(detector.state_dict())
    assert all(state[key].shape == tensor.shape for key, tensor in detector.state_dict().items())
    name, matches = choose_preset(shape)
    assert preset in matches and choose_preset(shape, preset)[0] == preset
    expected = ("group", False) if preset == "wav2vec2_small" else ("layer", preset != "hubert_xl")
    assert (shape.feat_extract_norm, shape.conv_bias) == expected


def test_the_fourteen_released_names_map_to_their_presets():
    released = released_checkpoints()
    models = {"xls-r-2b": "xlsr_2b", "xls-r-1b": "xlsr_1b", "mms-1b": "mms_1b", "mms-300m": "mms_300m",
              "wav2vec-large": "wav2vec2_large", "wav2vec-small": "wav2vec2_small", "hubert-xlarge": "hubert_xl"}
    expected = {f"nii-yamagishilab/{name}-anti-deepfake{suffix}": preset
                for name, preset in models.items() for suffix in ("", "-nda")}
    assert released == expected


def test_a_named_preset_must_have_the_checkpoint_shape(tmp_path):
    path = write_release(random_detector("tiny"), tmp_path)
    with pytest.raises(ConversionError, match="preset 'tiny_hubert' does not have this checkpoint's shape"):
        convert_checkpoint(path, preset="tiny_hubert")
    # a released repo id brings its preset: tiny weights under the small model's name are refused
    with pytest.raises(ConversionError, match="preset 'wav2vec2_small'"):
        convert_checkpoint(path, repo_id="nii-yamagishilab/wav2vec-small-anti-deepfake")


def test_a_parametrized_pos_conv_weight_norm_converts_too(tmp_path):
    reference = random_detector("tiny")
    renamed = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    state = {}
    for key, tensor in fairseq_release_state(reference).items():
        stem, _, leaf = key.rpartition(".")
        state[f"{stem}.{renamed[leaf]}" if "pos_conv" in stem and leaf in renamed else key] = tensor
    detector, _ = convert_checkpoint(write_release(reference, tmp_path, state))
    assert torch.equal(detector.encoder.encoder.pos_conv_embed.conv.weight,
                       reference.encoder.encoder.pos_conv_embed.conv.weight)


def test_a_hubert_without_label_embeddings_converts_when_its_preset_is_named(tmp_path):
    reference = random_detector("tiny_hubert")
    state = {k: v for k, v in fairseq_release_state(reference).items() if "label_embs" not in k}
    detector, identity = convert_checkpoint(write_release(reference, tmp_path, state), preset="tiny_hubert")
    assert identity["preset"] == "tiny_hubert" and type(detector.encoder).__name__ == "HubertModel"


def test_a_file_that_is_not_a_state_dict_is_rejected(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ConversionError, match=r"list\.pt: expected a state dict"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"weights\.npz: unknown checkpoint type"):
        read_state_dict(tmp_path / "weights.npz")


def test_a_family_posttrain_does_not_convert_is_refused_naming_it(tmp_path):
    """A fairseq checkpoint holding WavLM's gated relative position keys is WavLM's: refused in one line
    saying where WavLM is read from instead, not converted as a wav2vec 2.0."""
    unconverted = [backbone for backbone in BACKBONES.values() if not backbone.fairseq_convertible]
    assert unconverted  # WavLM
    state = fairseq_release_state(random_detector("tiny"))
    for backbone in unconverted:
        marked = {**state, f"m_ssl.model.{backbone.fairseq_markers[0]}.weight": torch.zeros(8, 16)}
        with pytest.raises(ConversionError, match=rf"a {backbone.name} checkpoint in the fairseq layout .* load "
                                                  rf"{backbone.name} from a transformers checkpoint"):
            convert_checkpoint(write_release(None, tmp_path / backbone.name, marked))


def test_a_converted_release_normalises_its_input_as_antideepfakes_layer_norm(tmp_path):
    """AntiDeepfake normalises with ``F.layer_norm(wav, wav.shape)`` (eps 1e-5, torch's default): the
    converted model, its export and the model reloaded from it must all use that, not transformers' 1e-7;
    at -60 dBFS the two eps give different inputs, so a wrong eps shows here without the fairseq fixtures."""
    import torch.nn.functional as F

    from posttrain.hub.export import export_detector, identity_document, load_export

    detector, _ = convert_checkpoint(write_release(random_detector("tiny"), tmp_path / "release"))
    quiet = 1e-3 * torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))  # about -60 dBFS
    reference = F.layer_norm(quiet, quiet.shape)  # AntiDeepfake's own line, with torch's own default eps
    exported = export_detector(detector, tmp_path / "export", identity_document(detector, preset="tiny"), "# card\n")
    for model in (detector, load_export(exported)[0]):
        ours = model.normalise(quiet, torch.tensor([4000]))
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert (F.layer_norm(quiet, quiet.shape, eps=1e-7) - reference).abs().max() > 1e-3  # the eps matters here


def test_a_one_class_release_converts_to_the_oc_head_and_refuses_a_transformers_export(tmp_path):
    """AD's ``Model(loss='ocsoftmax')`` keeps its OCAngleLayer under ``proj_fc``: one (D, 1) weight, no bias."""
    from posttrain.cli import main
    from posttrain.loading import _load_into, load_model
    from posttrain.models.oc_softmax import OCSoftmaxHead

    reference = random_detector("tiny")
    state = fairseq_release_state(reference)
    del state["proj_fc.bias"]
    oc_weight = torch.randn(reference.ssl_config.hidden_size, 1, generator=torch.Generator().manual_seed(4))
    state["proj_fc.weight"] = oc_weight
    write_release(reference, tmp_path / "release", state)

    detector, identity = load_model(tmp_path / "release")
    assert isinstance(detector.head, OCSoftmaxHead) and torch.equal(detector.head.weight.detach(), oc_weight)
    assert identity["head"]["head"] == "oc_softmax" and identity["score_definition"] == "cosine"
    assert (detector.head.w_posi, detector.head.w_nega, detector.head.alpha) == (0.9, 0.2, 20.0)  # AD's layer defaults
    waves, lengths = padded_batch()
    with torch.no_grad():
        pooled = reference.eval().embed(reference.normalise(waves, lengths), lengths).double()
        outputs = detector(detector.normalise(waves, lengths), lengths).double()
    cos = pooled @ oc_weight.double()[:, 0] / (pooled.norm(dim=1) * oc_weight.double().norm())
    torch.testing.assert_close(outputs, torch.stack([-cos, cos], dim=1), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="model.head=oc_softmax"):  # a lazily opened release keeps it too
        _load_into(lambda ssl_config, identity: build_detector(ModelConfig(preset="tiny"), ssl_config=ssl_config),
                   tmp_path / "release", "antideepfake", None, None)
    assert main(["hub", "convert", str(tmp_path / "release"), "--out", str(tmp_path / "export")]) == 2
    assert not (tmp_path / "export").exists()
