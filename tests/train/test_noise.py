"""Warnings that are noise to a user are silenced or said once in posttrain's own words."""

from __future__ import annotations

import logging
import os
import warnings

from posttrain.config import StreamConfig
from posttrain.data.stream import ShardStream


def test_more_workers_than_cpus_is_said_once_not_per_epoch(make_shard_set, monkeypatch, caplog):
    directory, ids = make_shard_set("noise", [3, 3])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # torch and posttrain both see one CPU
    stream = ShardStream(StreamConfig(shards=[str(directory)], num_workers=2, max_batch_seconds=3.0,
                                      shuffle_buffer=0, worker_start_method="fork"))
    seen = []
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        try:
            for epoch in range(2):
                stream.set_epoch(epoch)
                seen += [sample_id for batch in stream for sample_id in batch.ids]
        finally:
            stream.close()
    assert sorted(seen) == sorted(list(ids) * 2)  # the workers did load every sample, both epochs
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]
    said = [record.getMessage() for record in caplog.records if "worker processes on 1 CPU" in record.getMessage()]
    assert said == ["loader: 2 worker processes on 1 CPU(s) this process may use; they share the CPUs "
                    "(lower data.*.num_workers if loading is slow)"]


def test_loading_a_checkpoint_prints_nothing(tiny_checkpoint, capfd):
    from posttrain.train.checkpoint import load_detector_from_checkpoint

    capfd.readouterr()
    load_detector_from_checkpoint(tiny_checkpoint / "checkpoints")
    out, err = capfd.readouterr()
    assert "Processing zero checkpoint" not in out + err and "Reconstructed" not in out + err
