"""Embeddings of a shard set: row i equals Detector.embed of sample i run alone; ids, metadata and
counts follow the index; corrupt samples are left out and named; the folder reloads as a memmap."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.data.shards import iter_shard, load_index, shard_paths
from posttrain.eval.scoring import InferenceConfig
from posttrain.eval.scoring import WindowConfig
from posttrain.loading import load_model
from posttrain.eval.inference import ShardSource
from posttrain.select.embed import embed_source
from posttrain.select.embeddings import EmbeddingsError, load_embeddings


def _reference(model, shards):
    """(id, embedding, meta) of every sample in index order, each run alone, no padding."""
    rows = []
    for path in shard_paths(shards):
        for _, files in iter_shard(path):
            try:
                meta = json.loads(files["json"])
                wave, _ = sf.read(io.BytesIO(files["flac"]), dtype="float32")
            except Exception:
                continue  # the corrupt ones: embed must leave them out too
            x = torch.from_numpy(wave)
            x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7))[None]
            with torch.no_grad():
                rows.append((meta["id"], model.embed(x, torch.tensor([x.shape[1]]))[0].numpy(), meta))
    return rows


def test_rows_equal_embed_of_each_sample_alone(tiny_export_dir, make_shard_set, tmp_path):
    model, identity = load_model(tiny_export_dir)
    shards, _ = make_shard_set("emb", [4, 3, 5], seconds=(0.3, 2.5), corrupt={"EMB-1_1": "audio"})
    cfg = InferenceConfig(window=WindowConfig(1.0, 1.0, 0.25), batch_seconds=6, max_batch_size=4, progress=False)
    manifest = embed_source(model, ShardSource(shards), tmp_path / "out", cfg, model_identity=identity)
    array, meta = load_embeddings(tmp_path / "out")
    assert isinstance(array, np.memmap) and array.dtype == np.float32
    reference = _reference(model, shards)
    index = load_index(shards)
    keys = [k for shard in index["shards"] for k in shard["keys"]]
    assert [m["id"] for m in meta] == [r[0] for r in reference] == [k for k in keys if k != "EMB-1_1"]
    assert manifest["count"] == len(meta) == array.shape[0] == index["totals"]["samples"] - 1
    assert manifest["dim"] == array.shape[1] == model.ssl_config.hidden_size
    assert manifest["skipped"]["items"][0]["id"] == "EMB-1_1"
    assert manifest["data"]["index_sha256"] and manifest["model"]["preset"] == "tiny"
    # samples up to 2.5 s went through 1 s windows: the length-weighted mean of window embeddings
    # equals the whole-sample embedding only for one-window samples; compare those exactly, and
    # re-run the rest whole (window 0) to check they are the same samples in the same rows
    whole = InferenceConfig(window=WindowConfig(0.0), batch_seconds=6, max_batch_size=4, progress=False)
    embed_source(model, ShardSource(shards), tmp_path / "whole", whole, model_identity=identity)
    whole_array, whole_meta = load_embeddings(tmp_path / "whole")
    assert [m["id"] for m in whole_meta] == [m["id"] for m in meta]
    assert all(m["num_windows"] == 1 for m in whole_meta)
    # the head is linear: the head of a (window-mean) embedding is that sample's stored mean logits
    with torch.no_grad():
        head = model.head(torch.from_numpy(np.array(array))).numpy()
    np.testing.assert_allclose(head, [[m["logit_fake"], m["logit_real"]] for m in meta], atol=1e-5, rtol=0)
    for row, (sample_id, expected, source_meta) in enumerate(reference):
        np.testing.assert_allclose(whole_array[row], expected, atol=1e-5, rtol=0)
        if meta[row]["num_windows"] == 1:
            np.testing.assert_allclose(array[row], expected, atol=1e-5, rtol=0)
        assert (meta[row]["label"], meta[row]["speaker"]) == (source_meta["label"], source_meta["speaker"])
    assert any(m["num_windows"] > 1 for m in meta)


def test_incomplete_folder_is_refused(tmp_path):
    with pytest.raises(EmbeddingsError, match="embeddings.json"):
        load_embeddings(tmp_path)
