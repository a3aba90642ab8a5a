"""``posttrain hub convert|download`` and ``posttrain publish`` run as a user would, in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import fairseq_release_state, random_detector
from safetensors.torch import save_file
from transformers import AutoModelForAudioClassification

from posttrain.data.shards import load_index
from posttrain.eval.calibration import fit_calibration, load_calibration, save_calibration
from posttrain.eval.report import write_report

pytestmark = pytest.mark.slow
SNAPSHOT = "89abcdef0123456789abcdef0123456789abcdef"


def posttrain(*args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **env})


def assert_same_logits(folder, detector):
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    wave = torch.randn(1, 7000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(wave).logits, detector(wave, torch.tensor([7000])), atol=1e-5, rtol=1e-5)


def front_matter(readme):
    _, matter, _ = readme.read_text().split("---\n", 2)
    return yaml.safe_load(matter)


def test_hub_convert_a_local_release(tmp_path):
    reference = random_detector("tiny_group_norm", seed=0)
    save_file(fairseq_release_state(reference), tmp_path / "model.safetensors")
    done = posttrain("hub", "convert", tmp_path / "model.safetensors", "--out", tmp_path / "export", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "preset tiny_group_norm" in done.stdout and "licence cc-by-nc-sa-4.0" in done.stdout
    assert_same_logits(tmp_path / "export", reference)
    assert front_matter(tmp_path / "export" / "README.md")["license"] == "cc-by-nc-sa-4.0"
    identity = json.loads((tmp_path / "export" / "posttrain.json").read_text())
    assert identity["source"]["kind"] == "antideepfake" and len(identity["source"]["sha256"]) == 64


def test_hub_download_reads_the_cache_offline_and_explains_an_empty_one(tmp_path):
    reference = random_detector("tiny_hubert", seed=1)
    snapshot = tmp_path / "hf_home" / "hub" / "models--someone--tiny-anti-deepfake" / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(SNAPSHOT)
    save_file(fairseq_release_state(reference), snapshot / "model.safetensors")

    done = posttrain("hub", "download", "someone/tiny-anti-deepfake", "--out", tmp_path / "export", cwd=tmp_path,
                     HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert_same_logits(tmp_path / "export", reference)
    assert front_matter(tmp_path / "export" / "README.md")["base_model"] == "someone/tiny-anti-deepfake"

    empty = posttrain("hub", "download", "nii-yamagishilab/xls-r-2b-anti-deepfake", "--out", tmp_path / "x",
                      cwd=tmp_path, HF_HOME=str(tmp_path / "empty_home"), HF_HUB_OFFLINE="1")
    assert empty.returncode == 2
    assert "hf download nii-yamagishilab/xls-r-2b-anti-deepfake" in empty.stderr and "HF_HOME" in empty.stderr
    assert not (tmp_path / "x").exists()


def write_result(folder, seed):
    rng = np.random.default_rng(seed)
    records = [{"id": f"T-{i}", "score": float(rng.normal(1.5 if i % 2 else -1.5)), "label": i % 2,
                "score_type": "logit_diff"} for i in range(60)]
    write_report(folder, records, score_definition="logit_diff", model_identity={"preset": "tiny"},
                 data_identity={"name": f"set{seed}"})
    return folder / "result.yaml", records


def test_publish_a_trained_checkpoint_with_results_and_calibration(tiny_checkpoint, tmp_path):
    result_a, records = write_result(tmp_path / "a", 1)
    result_b, _ = write_result(tmp_path / "b", 2)
    calibration = fit_calibration([r["score"] for r in records], [r["label"] for r in records],
                                  score_definition="logit_diff")
    save_calibration(calibration, tmp_path / "calibration.json")

    done = posttrain("publish", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "model", "--results", result_a,
                     result_b, "--calibration", tmp_path / "calibration.json", "--repo-id", "me/tiny-detector",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    from posttrain.train.checkpoint import load_detector_from_checkpoint

    detector, _ = load_detector_from_checkpoint(tiny_checkpoint)
    assert_same_logits(tmp_path / "model", detector)
    identity = json.loads((tmp_path / "model" / "posttrain.json").read_text())
    assert identity["calibration"]["score_threshold"] == pytest.approx(
        load_calibration(tmp_path / "calibration.json").score_threshold())
    assert identity["training"]["progress"]["step"] == 2 and "loaded_from" not in identity

    readme = (tmp_path / "model" / "README.md").read_text()
    matter = front_matter(tmp_path / "model" / "README.md")
    assert matter["pipeline_tag"] == "audio-classification" and "license" not in matter  # none recorded
    eers = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in matter["model-index"][0]["results"]}
    for name, path in (("set1", result_a), ("set2", result_b)):
        document = yaml.safe_load(path.read_text())
        assert eers[name] == pytest.approx(100 * document["metrics"]["eer"], abs=1e-4)
        assert yaml.safe_dump(document, sort_keys=False) in readme  # the result.yaml itself is on the card
    assert "| train.zero_stage | 1 |" in readme  # the training config
    (shards,) = identity["training"]["config"]["data"]["train"]["shards"]
    for corpus, count in load_index(shards)["totals"]["by_corpus"].items():  # the shard totals
        assert f"| {corpus} | {count['seconds'] / 3600:.3f} | {count['samples']} |" in readme
    assert f"{identity['calibration']['score_threshold']:.6g}" in readme


def test_publish_push_uploads_the_folder(tmp_path, monkeypatch):
    """The one fake: the hub client (pushing for real needs the network)."""
    import huggingface_hub

    from posttrain.commands import publish
    from posttrain.hub.export import export_detector, identity_document

    detector = random_detector("tiny", seed=2)
    export_detector(detector, tmp_path / "source", identity_document(detector, preset="tiny"), "# card\n")
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **options):
            calls.append(("create_repo", repo_id, options))

        def upload_folder(self, **options):
            calls.append(("upload_folder", options["repo_id"], options))
            assert (tmp_path / "published" / "model.safetensors").is_file()  # uploaded after the export

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    parser = argparse.ArgumentParser()
    publish.configure(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "source"), "--out", str(tmp_path / "published"),
                              "--repo-id", "me/tiny", "--push", "--private"])
    assert publish.run(args) == 0
    assert [call[:2] for call in calls] == [("create_repo", "me/tiny"), ("upload_folder", "me/tiny")]
    assert calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2]["folder_path"] == str(tmp_path / "published") and calls[1][2]["repo_type"] == "model"

    no_repo = parser.parse_args(["--checkpoint", str(tmp_path / "source"), "--out", str(tmp_path / "p2"), "--push"])
    assert publish.run(no_repo) == 2 and not (tmp_path / "p2").exists()
