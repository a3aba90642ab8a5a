"""``posttrain eval`` and ``posttrain embed`` on 2 real ranks (gloo, spawned, the commands' own process
group from torchrun-style variables) against 1-process runs: same scores and metrics, every sample
exactly once, the same embeddings folder."""

import csv
import json
import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from posttrain.cli import main
from posttrain.dist import free_port
from posttrain.select.embeddings import load_embeddings

WORLD_SIZE = 2
CORRUPT = "DIST-2_1"


def _args(command, model, shards, out):
    # one window per forward pass: each sample's arithmetic is then the same whatever the rank split
    return [command, "--model", str(model), "--shards", str(shards), "--out", str(out), "--max-batch-size", "1",
            "--device", "cpu", "--no-progress"] + (["--by", "corpus"] if command == "eval" else [])


def _rank_main(rank, ports, model, shards, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1")
    codes = {}
    for command, port in zip(("eval", "embed"), ports):
        os.environ["MASTER_PORT"] = str(port)
        codes[command] = main(_args(command, model, shards, os.path.join(out_dir, f"{command}-2")))
    with open(os.path.join(out_dir, f"codes{rank}.json"), "w") as handle:
        json.dump(codes, handle)


def _scores(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def runs(tiny_export_dir, make_shard_set, tmp_path_factory):
    shards, durations = make_shard_set("dist", [3, 4, 2, 3], corrupt={CORRUPT: "audio"})
    out = tmp_path_factory.mktemp("eval_dist")
    mp.spawn(_rank_main, args=((free_port(), free_port()), str(tiny_export_dir), str(shards), str(out)),
             nprocs=WORLD_SIZE, join=True)
    for command in ("eval", "embed"):  # the 1-process references, same code path, no process group
        assert main(_args(command, tiny_export_dir, shards, out / f"{command}-1")) == 0
    return out, durations


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_eval_equals_one_rank(runs):
    out, durations = runs
    for rank in range(WORLD_SIZE):
        assert json.loads((out / f"codes{rank}.json").read_text()) == {"eval": 0, "embed": 0}
    two, one = _scores(out / "eval-2" / "scores.csv"), _scores(out / "eval-1" / "scores.csv")
    ids = [row["ID"] for row in two]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(set(durations) - {CORRUPT})  # each once
    assert two == one  # same order, same bytes of every score
    metrics_two = json.loads((out / "eval-2" / "metrics.json").read_text())
    metrics_one = json.loads((out / "eval-1" / "metrics.json").read_text())
    assert metrics_two["pooled"] == metrics_one["pooled"] and metrics_two["groups"] == metrics_one["groups"]
    import yaml

    result = yaml.safe_load((out / "eval-2" / "result.yaml").read_text())
    assert result["skipped"]["count"] == 1 and result["skipped"]["items"][0]["id"] == CORRUPT
    assert result["data"]["world_size"] == WORLD_SIZE and result["counts"]["trials"] == len(ids)


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_embed_equals_one_rank(runs):
    out, durations = runs
    two, meta_two = load_embeddings(out / "embed-2")
    one, meta_one = load_embeddings(out / "embed-1")
    assert meta_two == meta_one and len(meta_one) == len(durations) - 1
    np.testing.assert_array_equal(np.asarray(two), np.asarray(one))
    assert not (out / "embed-2" / ".parts").exists()
