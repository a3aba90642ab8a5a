"""``load_model``: every accepted model spec resolves to the same detector it holds."""

from __future__ import annotations

import pytest
import torch
from conftest import fairseq_release_state, random_detector
from safetensors.torch import save_file
from transformers import AutoModelForAudioClassification

from posttrain.config import ModelConfig
from posttrain.data.batch import normalize_waveforms
from posttrain.hub.export import export_detector, identity_document
from posttrain.models.detector import build_detector
from posttrain.hubcache import ModelNotAvailableError, hub_snapshot
from posttrain.loading import load_model, model_format

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the cache names snapshots


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6400, 4000])
    waves = torch.randn(2, 6400, generator=generator)
    waves[1, 4000:] = 0.0
    return normalize_waveforms(waves, lengths), lengths


def logits(detector, seed: int = 0):
    waves, lengths = batch(seed)
    with torch.no_grad():
        return detector(waves, lengths)


def cache_release(cache, repo_id, detector):
    """A Hugging Face cache entry as ``hf download`` leaves it: refs/main -> snapshots/<commit>/."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    (entry / "snapshots" / SNAPSHOT).mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SNAPSHOT)
    save_file(fairseq_release_state(detector), entry / "snapshots" / SNAPSHOT / "model.safetensors")


def test_export_folder_and_release_file_and_folder(tmp_path):
    reference = random_detector("tiny_hubert")
    export_dir = export_detector(reference, tmp_path / "export", identity_document(reference, preset="tiny_hubert"),
                                 "# card\n")
    (tmp_path / "release").mkdir()
    save_file(fairseq_release_state(reference), tmp_path / "release" / "model.safetensors")
    torch.save(fairseq_release_state(reference), tmp_path / "release.ckpt")
    expected = logits(reference)
    for spec, kind in [(export_dir, "transformers"), (tmp_path / "release", "antideepfake"),
                       (tmp_path / "release" / "model.safetensors", "antideepfake"),
                       (tmp_path / "release.ckpt", "antideepfake")]:
        detector, identity = load_model(str(spec))
        assert model_format(spec) == kind
        assert identity["loaded_from"]["format"] == kind and identity["preset"] == "tiny_hubert"
        torch.testing.assert_close(logits(detector), expected, atol=1e-6, rtol=1e-6)


def test_a_release_folder_with_a_hub_mixin_config_is_still_a_release(tmp_path):
    # PyTorchModelHubMixin writes its init arguments as config.json: not a transformers config
    reference = random_detector()
    save_file(fairseq_release_state(reference), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_name": "tiny"}')
    assert model_format(tmp_path) == "antideepfake"
    torch.testing.assert_close(logits(load_model(tmp_path)[0]), logits(reference), atol=0, rtol=0)


def test_hub_repo_id_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # HF_HOME/hub of this test
    assert constants.HF_HUB_OFFLINE  # tests run offline (conftest)
    reference = random_detector("tiny_group_norm", seed=1)
    cache_release(tmp_path / "hub", "someone/tiny-anti-deepfake", reference)

    detector, identity = load_model("someone/tiny-anti-deepfake")
    torch.testing.assert_close(logits(detector), logits(reference), atol=0, rtol=0)
    assert identity["loaded_from"]["repo_id"] == "someone/tiny-anti-deepfake"
    assert identity["base_model"] == "someone/tiny-anti-deepfake" and identity["license"] == "cc-by-nc-sa-4.0"

    with pytest.raises(ModelNotAvailableError) as error:
        load_model("nii-yamagishilab/mms-300m-anti-deepfake")
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and str(tmp_path / "hub") in message
    assert "hf download nii-yamagishilab/mms-300m-anti-deepfake" in message and "HF_HOME" in message


def test_empty_cache_offline_names_the_way_to_get_the_files(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="hf download nii-yamagishilab/xls-r-1b-anti-deepfake-nda"):
        hub_snapshot("nii-yamagishilab/xls-r-1b-anti-deepfake-nda", cache_dir=tmp_path / "empty")


def test_a_spec_that_is_neither_a_path_nor_a_repo_id_nor_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not a hub repo id"):
        load_model(str(tmp_path / "missing" / "model" / "x"))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path)


@pytest.mark.slow
def test_trained_checkpoint_loads_and_exports_with_the_same_logits(tiny_checkpoint, tmp_path):
    from posttrain.train.checkpoint import consolidate_fp32

    tag_dir = tiny_checkpoint / "checkpoints" / "step-00000002"
    for spec in (tiny_checkpoint, tiny_checkpoint / "checkpoints", tag_dir):  # run, checkpoints root, tag
        assert model_format(spec) == "checkpoint"
    detector, identity = load_model(tag_dir)
    assert identity["loaded_from"]["format"] == "checkpoint" and identity["source"]["path"] == str(tag_dir)
    assert identity["preset"] == "tiny" and identity["training"]["progress"]["step"] == 2
    assert "loader" not in identity["training"]  # resume-only state stays out of the identity

    state, _ = consolidate_fp32(tiny_checkpoint / "checkpoints")
    for key, tensor in detector.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    torch.manual_seed(1234)  # train.seed: the run's initial weights
    initial = build_detector(ModelConfig(preset="tiny")).state_dict()
    moved = (state["head.weight"] - initial["head.weight"]).abs().max()
    assert 0 < moved < 0.01  # two AdamW steps at lr 1e-3 from that init

    folder = export_detector(detector, tmp_path / "export", identity, "# card\n")
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    waves, lengths = batch(5)
    mask = (torch.arange(waves.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        torch.testing.assert_close(model(waves, attention_mask=mask).logits, detector(waves, lengths),
                                   atol=1e-5, rtol=1e-5)
    reloaded, published = load_model(folder)
    assert published["training"]["progress"]["step"] == 2
    torch.testing.assert_close(logits(reloaded), logits(detector), atol=1e-6, rtol=1e-6)
