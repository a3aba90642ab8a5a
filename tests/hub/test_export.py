"""posttrain Detector <-> stock transformers audio classifier: same logits, both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoModelForAudioClassification, Wav2Vec2Config, Wav2Vec2ForSequenceClassification, pipeline

from posttrain.config import ModelConfig
from posttrain.data.batch import normalize_waveforms
from posttrain.hub import export
from posttrain.hub.export import ExportError, export_detector, from_transformers, identity_document, load_export
from posttrain.models.detector import build_detector
from posttrain.models.backbones import get_backbone
from posttrain.models.presets import get_preset, tiny_presets



def random_detector(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    detector = build_detector(ModelConfig(preset=preset)).eval()
    with torch.no_grad():  # a head far from zero, so the logits are not all alike
        detector.head.weight.normal_(0.0, 1.0)
        detector.head.bias.normal_(0.0, 1.0)
    return detector


def publish(detector, folder, preset):
    return export_detector(detector, folder, identity_document(detector, preset=preset), "# card\n")


def raw_batch(seed: int = 0):
    """Three utterances of different lengths (not normalised, like audio read from files)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [8000, 5200, 3300]
    return [0.3 * torch.randn(n, generator=generator) + 0.05 for n in lengths]


def posttrain_logits(detector, waves):
    lengths = torch.tensor([w.numel() for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for row, wave in enumerate(waves):
        batch[row, : wave.numel()] = wave
    with torch.no_grad():
        return detector(normalize_waveforms(batch, lengths), lengths)


@pytest.mark.parametrize("preset", tiny_presets())
def test_stock_transformers_model_gives_posttrain_logits(preset, tmp_path):
    detector = random_detector(preset)
    folder = publish(detector, tmp_path / "export", preset)
    assert sorted(p.name for p in folder.iterdir()) == [".posttrain-export.json", "README.md", "config.json",
                                                      "model.safetensors", "posttrain.json", "preprocessor_config.json"]
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    assert type(model) is get_backbone(get_preset(preset).architecture).classifier_class  # the family's stock class
    assert model.config.id2label == {0: "fake", 1: "real"} and not model.config.use_weighted_layer_sum
    assert model.config.layerdrop == 0.0 and not model.config.apply_spec_augment

    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(folder)
    waves = raw_batch()
    inputs = extractor([w.numpy() for w in waves], sampling_rate=16000, padding=True, return_tensors="pt")
    assert "attention_mask" in inputs
    expected = posttrain_logits(detector, waves)  # padded, and equal to batch 1 for every preset
    with torch.no_grad():
        padded = model(**inputs).logits
        # each utterance alone without a mask (the pipeline's way): every frame counts, as in posttrain
        singles = torch.cat([model(**extractor(w.numpy(), sampling_rate=16000, return_tensors="pt")).logits
                             for w in waves])
    torch.testing.assert_close(singles, expected, atol=1e-5, rtol=1e-5)
    if model.config.feat_extract_norm == "group":  # stock GroupNorm takes the padding into its statistics
        assert (padded - expected).abs().max() > 1e-3
    else:
        torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)

    reloaded, identity = load_export(folder)  # and back to a posttrain detector
    torch.testing.assert_close(posttrain_logits(reloaded, waves), expected, atol=1e-6, rtol=1e-6)
    assert identity["preset"] == preset and identity["labels"] == ["fake", "real"]


def test_pipeline_scores_a_wav_file(tmp_path):
    detector = random_detector("tiny", seed=3)
    folder = publish(detector, tmp_path / "export", "tiny")
    wave = raw_batch(3)[0]
    sf.write(tmp_path / "speech.wav", wave.numpy(), 16000, subtype="FLOAT")
    results = pipeline("audio-classification", model=str(folder))(str(tmp_path / "speech.wav"))
    scores = {result["label"]: result["score"] for result in results}
    assert set(scores) == {"fake", "real"}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    expected = torch.softmax(posttrain_logits(detector, [wave])[0], dim=0)
    assert [scores["fake"], scores["real"]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_any_two_label_classifier_converts_in_fake_real_order():
    """A general classifier (wider projector, labels in the other order) becomes head = classifier o projector."""
    torch.manual_seed(4)
    config = Wav2Vec2Config(**get_preset("tiny").config_kwargs, classifier_proj_size=8, layerdrop=0.0,
                            id2label={0: "REAL", 1: "Fake"}, label2id={"REAL": 0, "Fake": 1})
    model = Wav2Vec2ForSequenceClassification(config).eval()
    detector = from_transformers(model)
    waves = raw_batch(4)[:1]
    with torch.no_grad():
        theirs = model(waves[0][None]).logits[0]
        ours = detector(waves[0][None], torch.tensor([waves[0].numel()]))[0]
    torch.testing.assert_close(ours, theirs.flip(0), atol=1e-5, rtol=1e-5)  # [fake, real] = [theirs[1], theirs[0]]


def test_labels_that_are_not_fake_and_real_are_refused():
    config = Wav2Vec2Config(**get_preset("tiny").config_kwargs)  # LABEL_0, LABEL_1
    with pytest.raises(ExportError, match="id2label"):
        from_transformers(Wav2Vec2ForSequenceClassification(config))
    weighted = Wav2Vec2Config(**get_preset("tiny").config_kwargs, use_weighted_layer_sum=True,
                              id2label={0: "fake", 1: "real"}, label2id={"fake": 0, "real": 1})
    with pytest.raises(ExportError, match="use_weighted_layer_sum"):
        from_transformers(Wav2Vec2ForSequenceClassification(weighted))


def test_a_failed_export_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    first = random_detector("tiny", seed=5)
    folder = publish(first, tmp_path / "export", "tiny")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken():
        raise OSError("disk full")

    monkeypatch.setattr(export, "feature_extractor", broken)
    with pytest.raises(OSError, match="disk full"):
        publish(random_detector("tiny", seed=6), folder, "tiny")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left behind

    monkeypatch.undo()
    second = random_detector("tiny", seed=6)
    publish(second, folder, "tiny")  # a good export replaces the folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    waves = raw_batch()
    torch.testing.assert_close(posttrain_logits(load_export(folder)[0], waves), posttrain_logits(second, waves))


def test_a_preprocessor_that_does_not_normalise_is_refused(tmp_path):
    folder = publish(random_detector("tiny"), tmp_path / "export", "tiny")
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "do_normalize": False}))
    with pytest.raises(ExportError, match="preprocessor_config.json: do_normalize"):
        load_export(folder)


def test_identity_without_posttrain_json_is_read_from_the_config(tmp_path):
    folder = publish(random_detector("tiny_group_norm"), tmp_path / "export", "tiny_group_norm")
    (folder / "posttrain.json").unlink()
    _, identity = load_export(folder)
    assert identity["preset"] == "tiny_group_norm" and identity["architecture"] == "wav2vec2"
    assert np.isclose(identity["ssl_config"]["hidden_size"], 32)
