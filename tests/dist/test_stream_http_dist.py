"""The loader over HTTP in a real process group: 2 ranks (gloo, spawned) x 2 DataLoader workers read
shard sets from a loopback HTTP server that breaks every shard download mid-way."""

import json
import os
from collections import Counter

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DroppingHTTPServer

from posttrain.config import CropConfig, StreamConfig
from posttrain.data.stream import ShardStream
from posttrain.dist import free_port

WORLD_SIZE = 2


def _cfg(locations):
    return StreamConfig(shards=list(locations), weights=[1.0, 2.0], max_batch_seconds=2.0, shuffle_buffer=8,
                        num_workers=2, crop=CropConfig(policy="none"), read_attempts=6, read_backoff_seconds=0.01,
                        read_timeout_seconds=10.0)


def _epoch(stream, limit=None):
    """Per batch: ids and each sample's sum (the audio must be the bytes of the shards)."""
    batches = []
    for batch in stream:
        batches.append([[i, float(batch.waveforms[r, : batch.lengths[r]].double().sum())]
                        for r, i in enumerate(batch.ids)])
        if len(batches) == limit:
            break
    stream.close()
    return batches


def _rank_main(rank, port, urls, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result = {"full": _epoch(ShardStream(_cfg(urls)))}
        first = ShardStream(_cfg(urls))
        result["before"] = _epoch(first, limit=2)
        resumed = ShardStream(_cfg(urls))
        resumed.load_state_dict(json.loads(json.dumps(first.global_state_dict())))
        result["after"] = _epoch(resumed)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_with_workers_read_http_shards_through_dropped_connections_exactly_once(make_shard_set, tmp_path):
    u_dir, u = make_shard_set("hu", [9, 3, 4], seconds=(0.3, 0.8), seed=21)
    v_dir, v = make_shard_set("hv", [4, 5], seconds=(0.2, 0.5), seed=22)
    assert u_dir.parent == v_dir.parent
    expected = Counter({i: 1 for i in u}) + Counter({i: 2 for i in v})  # weights 1 and 2
    local = {i: s for batch in _epoch(ShardStream(_cfg([u_dir, v_dir]), rank=0, world_size=1)) for i, s in batch}

    with DroppingHTTPServer(u_dir.parent) as server:
        urls = [f"{server.url}/{u_dir.name}", f"{server.url}/{v_dir.name}"]
        mp.spawn(_rank_main, args=(free_port(), urls, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]

    full = [pair for result in results for batch in result["full"] for pair in batch]
    assert Counter(i for i, _ in full) == expected  # every sample exactly once (v's twice: weight 2)
    assert all(abs(s - local[i]) < 1e-9 for i, s in full)  # the audio survived the broken downloads
    assert len(results[0]["full"]) == len(results[1]["full"])  # equal batch counts (join batches)
    interrupted = [i for result in results for key in ("before", "after") for batch in result[key] for i, _ in batch]
    assert Counter(interrupted) == expected  # interrupted after 2 batches per rank, resumed: still exactly once
    # every shard download from byte 0 was broken mid-way; some were resumed from where they broke
    assert server.drops >= 5 and server.resumed >= 5
