"""The inference core on real inputs: shard set vs protocol CSV of the same corpus, padding/batching
invariance against samples run one by one, corrupt samples skipped and counted, rank splits."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.data.shard_build import build_shards
from posttrain.data.shards import iter_shard, load_index, sample_key, shard_paths
from posttrain.dist import DistInfo
from posttrain.eval.inference import ProtocolSource, ShardSource, Task, rank_tasks, run_inference
from posttrain.eval.scoring import InferenceConfig
from posttrain.eval.scoring import WindowConfig
from posttrain.loading import load_model


@pytest.fixture(scope="module")
def model(tiny_export_dir):
    return load_model(tiny_export_dir)[0]


def _cfg(**options) -> InferenceConfig:
    return InferenceConfig(window=WindowConfig(13, 13, 1), progress=False, **options)


def test_shards_and_protocol_of_one_corpus_give_the_same_scores(model, make_corpus, tmp_path):
    corpus = make_corpus("same", num_files=9, bad=("unreadable", "empty", "rate"))
    shards = tmp_path / "shards"
    build_shards([corpus.protocol], root=corpus.root, out=shards, name="same", max_samples_per_shard=4, seed=0)
    from_shards = run_inference(model, ShardSource(shards), _cfg())
    from_protocol = run_inference(model, ProtocolSource(corpus.protocol, corpus.root), _cfg())
    # the shard builder rejected the bad files; the protocol run meets them, skips and names them
    assert from_shards.skipped == []
    assert {s.id: s.reason for s in from_protocol.skipped} == corpus.rejects
    assert [o.id for o in from_protocol.outputs] == [row.id for row in corpus.good_rows]  # CSV order
    by_id = {o.id: o for o in from_shards.outputs}
    assert sorted(by_id) == sorted(o.id for o in from_protocol.outputs)
    for out in from_protocol.outputs:
        twin = by_id[out.id]
        assert (twin.meta["label"], twin.meta["attack"], twin.meta["language"]) == \
               (out.meta["label"], out.meta["attack"], out.meta["language"])
        assert twin.num_samples == out.num_samples
        # shards store 16-bit PCM: the only difference is that quantisation (~3e-5 of full scale)
        np.testing.assert_allclose(twin.logits, out.logits, atol=1e-4, rtol=0)


def test_mixed_length_batches_equal_samples_run_one_by_one(model, shard_dir):
    batched = run_inference(model, ShardSource(shard_dir), _cfg(batch_seconds=200, max_batch_size=64))
    # independent reference: read the tars directly, normalise each waveform alone, no padding
    expected = {}
    for path in shard_paths(shard_dir):
        for _, files in iter_shard(path):
            wave, _ = sf.read(io.BytesIO(files["flac"]), dtype="float32")
            x = torch.from_numpy(wave)
            x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7))[None]
            with torch.no_grad():
                expected[json.loads(files["json"])["id"]] = model(x, torch.tensor([x.shape[1]]))[0].numpy()
    index = load_index(shard_dir)
    assert [sample_key(o.id) for o in batched.outputs] == [k for shard in index["shards"] for k in shard["keys"]]
    lengths = {o.num_samples for o in batched.outputs}
    assert len(lengths) > 1  # the batch really mixed lengths (padding in play)
    assert len(batched.outputs) == len(expected) == index["totals"]["samples"]
    for out in batched.outputs:
        np.testing.assert_allclose(out.logits, expected[out.id], atol=1e-5, rtol=0)


def test_corrupt_and_missing_shard_samples_are_skipped_counted_and_named(model, make_shard_set):
    directory, durations = make_shard_set("bad", [3, 3], corrupt={"BAD-0_1": "audio", "BAD-1_2": "json"})
    index = json.loads((directory / "index.json").read_text())
    index["shards"][1]["keys"].append("BAD-1_9")  # in the index, never written: counted as missing
    index["shards"][1]["samples"] += 1
    (directory / "index.json").write_text(json.dumps(index))
    result = run_inference(model, ShardSource(directory), _cfg())
    skipped = {s.id: (s.reason, s.detail) for s in result.skipped}
    assert skipped["BAD-0_1"][0] == "corrupt" and "flac" in skipped["BAD-0_1"][1]
    assert skipped["BAD-1_2"][0] == "corrupt" and "json" in skipped["BAD-1_2"][1]
    assert skipped["BAD-1_9"][0] == "missing" and "bad-000001.tar" in skipped["BAD-1_9"][1]
    assert sorted(o.id for o in result.outputs) == sorted(set(durations) - {"BAD-0_1", "BAD-1_2"})
    # each index position accounted exactly once, in index order
    positions = sorted([o.position for o in result.outputs] + [s.position for s in result.skipped])
    assert positions == list(range(7))


def test_rank_shares_are_disjoint_balanced_and_cover_every_task():
    tasks = [Task(weight, 1, i) for i, weight in enumerate([5.0, 1.0, 1.0, 3.0, 2.0, 4.0])]
    shares = [[task.payload for task in rank_tasks(tasks, DistInfo(rank, 3))] for rank in range(3)]
    assert sorted(p for share in shares for p in share) == list(range(6))
    assert sorted(sum(tasks[p].weight for p in share) for share in shares) == [5.0, 5.0, 6.0]
