"""The streaming loader in real process groups: 2 ranks (gloo, spawned) x 0/1/2 DataLoader workers."""

import json
import os
from collections import Counter

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.config import StreamConfig
from posttrain.data.stream import ShardStream
from posttrain.dist import free_port

WORLD_SIZE = 2
STOP_AFTER = 2  # batches taken on every rank before the simulated interruption


def _cfg(dirs, num_workers):
    return StreamConfig(shards=[str(d) for d in dirs], weights=[1.0, 2.0], max_batch_seconds=2.0,
                        shuffle_buffer=8, num_workers=num_workers)


def _epoch(stream, limit=None):
    per_batch = []
    for batch in stream:
        per_batch.append(batch.ids)
        if len(per_batch) == limit:
            break
    return {"ids": [i for ids in per_batch for i in ids], "batches": len(per_batch),
            "joins": sum(not ids for ids in per_batch), "per_batch": per_batch}


def _rank_main(rank, port, dirs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result = {f"full{w}": _epoch(ShardStream(_cfg(dirs, w))) for w in (0, 1, 2)}
        first = ShardStream(_cfg(dirs, 2))  # rank and world size come from the process group
        result["before"] = _epoch(first, limit=STOP_AFTER)
        state = first.global_state_dict()  # collective: every rank gets the merged state
        resumed = ShardStream(_cfg(dirs, 1))
        resumed.load_state_dict(json.loads(json.dumps(state)))
        result["after"] = _epoch(resumed)
        same = ShardStream(_cfg(dirs, 2))  # same world size and worker count: an exact resume
        same.load_state_dict(json.loads(json.dumps(state)))
        result["after_same"] = _epoch(same)
        result["state"] = state
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_deliver_each_sample_once_with_equal_batch_counts_and_resume(make_shard_set, tmp_path):
    # unbalanced shards: the rank holding the 12-sample shard has more batches, the other must join
    u_dir, u = make_shard_set("u", [12, 2, 2], seconds=(0.5, 1.0), seed=3, corrupt={"U-0_5": "audio"})
    v_dir, v = make_shard_set("v", [3, 3, 3], seconds=(0.2, 0.6), seed=4)
    dirs = [str(u_dir), str(v_dir)]
    expected = Counter({i: 1 for i in u if i != "U-0_5"}) + Counter({i: 2 for i in v})  # weights 1 and 2

    mp.spawn(_rank_main, args=(free_port(), dirs, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]

    for workers in (0, 1, 2):
        runs = [result[f"full{workers}"] for result in results]
        assert Counter(runs[0]["ids"] + runs[1]["ids"]) == expected, workers
        assert runs[0]["batches"] == runs[1]["batches"], workers
        assert runs[0]["joins"] + runs[1]["joins"] > 0, workers

    before = [i for result in results for i in result["before"]["ids"]]
    after = [i for result in results for i in result["after"]["ids"]]
    assert all(result["before"]["batches"] == STOP_AFTER for result in results)
    assert results[0]["after"]["batches"] == results[1]["after"]["batches"]
    assert Counter(before) + Counter(after) == expected  # 2 workers -> 1 worker, same world size
    for result in results:  # 2 workers -> 2 workers: each rank hands out the uninterrupted batches, joins too
        assert result["before"]["per_batch"] + result["after_same"]["per_batch"] == result["full2"]["per_batch"]

    # world size 2 -> 1: the merged global state resumes on a single process
    assert results[0]["state"] == results[1]["state"]
    single = ShardStream(_cfg(dirs, 2), rank=0, world_size=1)
    single.load_state_dict(results[0]["state"])
    assert Counter(before) + Counter(_epoch(single)["ids"]) == expected
