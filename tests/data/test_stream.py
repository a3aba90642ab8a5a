import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from posttrain.config import CropConfig, StreamConfig
from posttrain.data.batching import antideepfake_plan, delivered_lengths, fitted_edges
from posttrain.data.read_order import balance, crop_window, decode_positions, encode_positions, epoch_units, read_order
from posttrain.data.shard_set import ShardSet
from posttrain.data.stream import ShardStream, merge_states

RATE_HZ = 16000


@pytest.fixture(scope="module")
def sets(make_shard_set):
    """Two shard sets: ``a`` (4 shards, 2 corrupt samples) and ``b`` (3 shards)."""
    a_dir, a = make_shard_set("a", [5, 7, 3, 6], seed=1, corrupt={"A-1_2": "audio", "A-2_0": "json"})
    b_dir, b = make_shard_set("b", [4, 4, 5], seed=2)
    return {"a": a_dir, "b": b_dir, "a_ids": set(a) - {"A-1_2", "A-2_0"}, "b_ids": set(b)}


def _cfg(*dirs, **options) -> StreamConfig:
    defaults = dict(shards=[str(d) for d in dirs], max_batch_seconds=3.0, shuffle_buffer=8, num_workers=0,
                    max_batch_size=16)
    defaults.update(options)
    return StreamConfig(**defaults)


def _ids(stream, limit=None) -> list[str]:
    """Ids of the batches taken; stops right after the ``limit``-th (a batch is consumed once handed out)."""
    ids = []
    for step, batch in enumerate(stream, start=1):
        ids += batch.ids
        if step == limit:
            break
    return ids


def _reference_waves(directory: Path) -> dict[str, tuple[np.ndarray, str]]:
    """id -> (samples, label) read straight from the tars with tarfile + soundfile."""
    waves, members = {}, {}
    for tar_path in sorted(directory.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for parts in members.values():
        try:
            meta = json.loads(parts["json"])
            samples, _ = sf.read(io.BytesIO(parts["flac"]), dtype="float32")
        except (ValueError, RuntimeError):
            continue
        waves[meta["id"]] = (samples, meta["label"])
    return waves


@pytest.mark.parametrize("num_workers,start_method", [(0, "fork"), (2, "fork"), (2, "spawn")])
def test_epoch_delivers_every_sample_once_decoded_and_raw(sets, num_workers, start_method):
    stream = ShardStream(_cfg(sets["a"], num_workers=num_workers, worker_start_method=start_method),
                         rank=0, world_size=1)
    reference = _reference_waves(sets["a"])
    seen = []
    for batch in stream:
        assert batch.waveforms.shape[1] == int(batch.lengths.max())
        for row, sample_id in enumerate(batch.ids):
            valid = batch.waveforms[row, : batch.lengths[row]].numpy()
            raw, label = reference[sample_id]
            # raw audio: normalisation is the train step's, after on-device augmentation
            np.testing.assert_allclose(valid, raw, atol=1e-6)
            assert float(batch.waveforms[row, batch.lengths[row]:].abs().sum()) == 0.0
            assert int(batch.labels[row]) == (1 if label == "real" else 0)
            assert batch.meta[row]["id"] == sample_id
        seen += batch.ids
    assert Counter(seen) == Counter(sets["a_ids"])
    stats = stream.stats()
    assert stats["samples"] == len(sets["a_ids"]) and stats["corrupt"] == 2
    assert stats["corrupt_by_reason"] == {"audio": 1, "json": 1}
    assert stats["join_batches"] == 0 and 0.0 <= stats["padding_fraction"] < 0.5
    # corrupt samples count as consumed: the state says every shard is fully read
    assert stream.state_dict()["consumed"] == {"0:0:0": 5, "0:1:0": 7, "0:2:0": 3, "0:3:0": 6}


def test_workers_outlive_the_schedulers_warning(sets):
    """SLURM signals every process of a job step (USR1 from sbatch's trap, USR2 from submitit): a loader
    worker must neither die of it nor act on it; its rank decides when to stop."""
    import os
    import signal

    stream = ShardStream(_cfg(sets["a"], num_workers=2, max_batch_size=2), rank=0, world_size=1)
    batches = iter(stream)
    seen = list(next(batches).ids)
    for worker in stream._loader._iterator._workers:
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGUSR2)
    for batch in batches:
        seen += batch.ids
    assert Counter(seen) == Counter(sets["a_ids"])
    assert all(worker.is_alive() for worker in stream._loader._iterator._workers)
    stream.close()


def test_a_warning_during_a_workers_start_does_not_kill_it(sets, monkeypatch):
    """The warning can come before a worker has run its ``worker_init_fn``: each worker here is sent both
    at its very start, before it ignores them (they would kill it: pytest leaves the default action)."""
    import os
    import signal

    import posttrain.data.stream as stream_module

    ignore = stream_module.ignore_scheduler_signals

    def warned_then_ignore(worker_id: int) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        ignore(worker_id)

    monkeypatch.setattr(stream_module, "ignore_scheduler_signals", warned_then_ignore)
    stream = ShardStream(_cfg(sets["a"], num_workers=2, max_batch_size=2), rank=0, world_size=1)
    seen = [sample_id for batch in stream for sample_id in batch.ids]
    assert Counter(seen) == Counter(sets["a_ids"])
    assert all(worker.is_alive() for worker in stream._loader._iterator._workers)
    assert not {signal.SIGUSR1, signal.SIGUSR2} & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the rank's back
    stream.close()


def test_batches_bound_padded_seconds(sets):
    stream = ShardStream(_cfg(sets["a"], sets["b"], max_batch_seconds=2.5, num_buckets=4), rank=0, world_size=1)
    for batch in stream:
        assert len(batch) == 1 or len(batch) * batch.waveforms.shape[1] <= 2.5 * RATE_HZ


def test_epoch_order_reseeded_per_epoch_and_reproducible(sets):
    shard_sets = [ShardSet.load(sets["a"]), ShardSet.load(sets["b"])]
    orders = [epoch_units(shard_sets, [1.0, 1.0], seed=7, epoch=e) for e in range(4)]
    assert orders[0] == epoch_units(shard_sets, [1.0, 1.0], seed=7, epoch=0)
    assert len({tuple(order) for order in orders}) == 4  # a fixed seed would repeat one order
    assert all(sorted(order) == sorted(orders[0]) for order in orders)


def test_weights_are_per_epoch_repeat_factors(sets):
    shard_sets = [ShardSet.load(sets["a"]), ShardSet.load(sets["b"])]
    subsets = set()
    for epoch in range(5):
        units = epoch_units(shard_sets, [2.5, 0.34], seed=3, epoch=epoch)
        per_set = Counter(u.set_index for u in units)
        assert per_set == {0: 4 * 2 + 2, 1: 1}  # floor(w) * n + round(frac(w) * n)
        occurrences = Counter((u.set_index, u.shard_index) for u in units)
        assert sorted(occurrences[(0, i)] for i in range(4)) == [2, 2, 3, 3]
        subsets.add(frozenset(u.shard_index for u in units if u.set_index == 0 and u.occurrence == 2))
    assert len(subsets) > 1  # the fractional subset is drawn afresh each epoch

    stream = ShardStream(_cfg(sets["a"], sets["b"], weights=[2.0, 1.0]), rank=0, world_size=1)
    counts = Counter(_ids(stream))
    assert counts == Counter({i: 2 for i in sets["a_ids"]} | {i: 1 for i in sets["b_ids"]})
    assert stream.epoch_samples() == 2 * 21 + 13


def test_batches_carry_the_read_so_repeats_get_their_own_rawboost(sets):
    """Weight 2 reads every shard of ``a`` twice per epoch: each file arrives once as repeat 0 and
    once as repeat 1, and RawBoost (seeded by the read) gives the two copies different noise."""
    import torch

    from posttrain.augment.rawboost import RawBoost
    from posttrain.config import RawBoostConfig

    stream = ShardStream(_cfg(sets["a"], weights=[2.0], crop=CropConfig(policy="none")), rank=0, world_size=1)
    rawboost = RawBoost(RawBoostConfig(), algo=5)
    reads: dict[str, dict[int, torch.Tensor]] = {}
    for batch in stream:
        assert len(batch.repeats) == len(batch)
        augmented = rawboost(batch, epoch=0)
        for row, (sample_id, repeat) in enumerate(zip(batch.ids, batch.repeats)):
            reads.setdefault(sample_id, {})[repeat] = augmented.waveforms[row, : batch.lengths[row]]
    assert set(reads) == sets["a_ids"] and all(sorted(r) == [0, 1] for r in reads.values())
    assert all((r[0] - r[1]).abs().max() > 1e-3 for r in reads.values())


def test_ranks_without_process_group_split_units_disjointly_and_balanced(sets):
    streams = [ShardStream(_cfg(sets["a"], sets["b"]), rank=r, world_size=2) for r in range(2)]
    per_rank = [_ids(s) for s in streams]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(sets["a_ids"] | sets["b_ids"])
    shard_seconds = [sh.seconds for d in ("a", "b") for sh in ShardSet.load(sets[d]).shards]
    loads = [s.stats()["source_seconds"] for s in streams]
    corrupt_seconds = 2.0  # the two corrupt samples (< 1 s each) are not decoded
    assert abs(loads[0] - loads[1]) <= max(shard_seconds) + corrupt_seconds


def test_balance_is_greedy_longest_first():
    # 5 -> p0, 4 -> p1, 2 -> p1, 2 -> p0, 1 -> p1: loads 7 and 7
    assert balance([5.0, 1.0, 4.0, 2.0, 2.0], 2) == [[0, 4], [1, 2, 3]]
    assert balance([1.0], 3) == [[0], [], []]


def test_positions_encoding_is_compact_and_round_trips():
    assert encode_positions(range(7)) == 7
    assert encode_positions([]) == 0
    assert encode_positions([0, 1, 2, 5, 6, 9]) == [[0, 3], [5, 7], [9, 10]]
    assert encode_positions([3, 4]) == [[3, 5]]
    for positions in ([], [0], [1, 2, 3], [0, 2, 4, 5, 6, 10]):
        assert decode_positions(encode_positions(positions)) == set(positions)


@pytest.mark.parametrize("workers_before,workers_after,stop_after", [(0, 2, 2), (2, 1, 3), (2, 0, 1)])
def test_interrupted_epoch_resumes_exactly_once(sets, workers_before, workers_after, stop_after):
    cfg = dict(weights=[2.0, 1.0], shuffle_buffer=16)
    full = Counter({i: 2 for i in sets["a_ids"]} | {i: 1 for i in sets["b_ids"]})
    first = ShardStream(_cfg(sets["a"], sets["b"], num_workers=workers_before, **cfg), rank=0, world_size=1)
    first.set_epoch(3)
    before = _ids(first, limit=stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == 3 and sum(map(len, before)) > 0

    resumed = ShardStream(_cfg(sets["a"], sets["b"], num_workers=workers_after, **cfg), rank=0, world_size=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the engine's loop calls it; the same epoch keeps the restored progress
    after = _ids(resumed)
    assert Counter(before) + Counter(after) == full
    # each of the 2 corrupt samples of set a (weight 2) is counted once over both runs
    assert first.stats()["corrupt"] + resumed.stats()["corrupt"] == 4
    resumed.set_epoch(4)  # a new epoch starts from scratch
    assert Counter(_ids(resumed)) == full


def _batch_ids(stream, limit=None) -> list[list[str]]:
    """Ids per batch handed out; stops right after the ``limit``-th."""
    batches = []
    for batch in stream:
        batches.append(batch.ids)
        if len(batches) == limit:
            break
    return batches


def _stream(sets, state=None, *, rank=0, world_size=1, **options):
    """A stream over both sets (weights 2 and 1) at epoch 3, restored from ``state`` as a checkpoint
    stores it (JSON)."""
    options = dict(dict(weights=[2.0, 1.0], shuffle_buffer=16, max_batch_seconds=2.0), **options)
    stream = ShardStream(_cfg(sets["a"], sets["b"], **options), rank=rank, world_size=world_size, epoch=3)
    if state is not None:
        stream.load_state_dict(json.loads(json.dumps(state)))
    return stream


@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (1, 1), (2, 1), (2, 2)])
def test_mid_epoch_resume_hands_out_the_uninterrupted_batches(sets, num_workers, world_size):
    """Same world size and worker count: the resumed run's batches (ids, in order) are exactly the
    rest of an uninterrupted epoch, wherever it stopped; corrupt samples are counted once."""
    where = dict(rank=world_size - 1, world_size=world_size, num_workers=num_workers)
    full = _stream(sets, **where)
    expected = _batch_ids(full)
    assert len(expected) >= 6
    for stop in (1, len(expected) // 2, len(expected) - 1):
        first = _stream(sets, **where)
        before = _batch_ids(first, limit=stop)
        resumed = _stream(sets, first.state_dict(), **where)
        assert before + _batch_ids(resumed) == expected, stop
        assert first.stats()["corrupt"] + resumed.stats()["corrupt"] == full.stats()["corrupt"]


def test_replanned_resume_is_itself_resumed_exactly(sets):
    """2 workers -> 1 re-plans the rest of the epoch (still exactly once); a second interruption
    under the new plan resumes exactly (0 workers read like 1: one role)."""
    first = _stream(sets, num_workers=2)
    before = _batch_ids(first, limit=3)
    state = first.state_dict()
    expected = _batch_ids(_stream(sets, state, num_workers=1))
    everything = Counter({i: 2 for i in sets["a_ids"]} | {i: 1 for i in sets["b_ids"]})
    assert Counter(i for batch in before + expected for i in batch) == everything
    second = _stream(sets, state, num_workers=1)
    middle = _batch_ids(second, limit=2)
    assert middle + _batch_ids(_stream(sets, second.state_dict(), num_workers=0)) == expected


def test_read_order_mixes_lanes_within_a_bounded_window():
    sizes = [50, 80, 30, 60, 70, 40, 90]
    lanes, window = 3, 20
    order = read_order(sizes, lanes, window, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    assert np.array_equal(order, read_order(sizes, lanes, window, np.random.default_rng(0)))
    unit_of = np.repeat(np.arange(len(sizes)), sizes)[order]
    index_in_unit = (np.arange(sum(sizes)) - np.repeat(np.cumsum(sizes) - sizes, sizes))[order]
    # from the first sample to the last, every stretch of 30 mixes samples of all three lanes' shards
    assert all(len(set(unit_of[s:s + 30].tolist())) >= lanes for s in range(0, sum(sizes) - 30, 10))
    # reading each unit front to back on demand holds few samples: at most window + lanes
    read_up_to, held, most = [0] * len(sizes), 0, 0
    for unit, index in zip(unit_of.tolist(), index_in_unit.tolist()):
        if index >= read_up_to[unit]:
            held += index - read_up_to[unit]
            read_up_to[unit] = index + 1
        else:
            held -= 1
        most = max(most, held)
    assert most <= window + lanes
    # without a window and with one lane the units are read in order, sample by sample
    assert read_order(sizes, 1, 0, np.random.default_rng(0)).tolist() == list(range(sum(sizes)))


def test_merged_states_of_two_ranks_resume_on_one(sets):
    streams = [ShardStream(_cfg(sets["a"], sets["b"]), rank=r, world_size=2) for r in range(2)]
    before = _ids(streams[0], limit=2) + _ids(streams[1], limit=1)
    merged = merge_states([s.state_dict() for s in streams])
    single = ShardStream(_cfg(sets["a"], sets["b"], num_workers=1), rank=0, world_size=1)
    single.load_state_dict(merged)
    assert Counter(before + _ids(single)) == Counter(sets["a_ids"] | sets["b_ids"])


def test_load_state_rejects_a_different_setup(sets):
    state = ShardStream(_cfg(sets["a"]), rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardStream(_cfg(sets["a"], seed=1), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shard sets differ"):
        ShardStream(_cfg(sets["a"], sets["b"]), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="epoch"):
        merge_states([state, dict(state, epoch=1)])


def test_crop_window_policies():
    rng = np.random.default_rng(0)
    adf = CropConfig()
    for seconds in (13.5, 20.0, 60.0):
        start, length = crop_window(int(seconds * RATE_HZ), adf, RATE_HZ, lambda: rng)
        assert 10 * RATE_HZ <= length <= 13 * RATE_HZ and 0 <= start <= seconds * RATE_HZ - length
    assert crop_window(13 * RATE_HZ, adf, RATE_HZ, lambda: rng) == (0, 13 * RATE_HZ)  # not longer than 13 s
    lengths = {crop_window(30 * RATE_HZ, adf, RATE_HZ, lambda: rng)[1] for _ in range(200)}
    assert len(lengths) > 100  # uniform random length, not a constant
    fixed = CropConfig(policy="fixed", fixed_seconds=4.0)
    assert crop_window(10 * RATE_HZ, fixed, RATE_HZ, lambda: rng)[1] == 4 * RATE_HZ
    assert crop_window(3 * RATE_HZ, fixed, RATE_HZ, lambda: rng) == (0, 3 * RATE_HZ)
    assert crop_window(100 * RATE_HZ, CropConfig(policy="none"), RATE_HZ, lambda: rng) == (0, 100 * RATE_HZ)


def test_loader_crops_reproducibly_per_epoch_and_says_where(sets):
    """Each cropped row is the source file's slice at the offset its batch states (``offsets_samples``),
    checked against an independent decode of the shard's FLAC (soundfile); offsets vary, a file kept
    whole starts at 0, and the crops are the same on a re-read and differ the next epoch."""
    crop = CropConfig(crop_above_seconds=0.5, min_seconds=0.3, max_seconds=0.4)
    reference = _reference_waves(sets["b"])

    def windows(epoch):
        stream = ShardStream(_cfg(sets["b"], crop=crop), rank=0, world_size=1, epoch=epoch)
        out = {}
        for batch in stream:
            assert len(batch.offsets_samples) == len(batch)
            for row, (sample_id, offset) in enumerate(zip(batch.ids, batch.offsets_samples)):
                n = int(batch.lengths[row])
                raw = reference[sample_id][0]
                np.testing.assert_array_equal(batch.waveforms[row, :n].numpy(), raw[offset:offset + n])
                if raw.size > 0.5 * RATE_HZ:
                    assert 0.3 * RATE_HZ <= n <= 0.4 * RATE_HZ
                else:
                    assert (offset, n) == (0, raw.size)
                out[sample_id] = (offset, n)
        return out

    first = windows(0)
    cropped = [offset for sample_id, (offset, _) in first.items() if reference[sample_id][0].size > 0.5 * RATE_HZ]
    assert len(cropped) >= 5 and len(set(cropped)) == len(cropped) and min(cropped) > 0
    assert windows(0) == first  # seeded per (seed, epoch, sample): identical on a re-read
    assert windows(1) != first


def test_stream_command_prints_per_epoch_table(sets, capsys):
    from posttrain.cli import main

    assert main(["stream", "--shards", str(sets["a"]), str(sets["b"]), "--weights", "1", "2",
                 "--num-workers", "0", "--epochs", "2", "--max-batch-seconds", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0].split(), [line.split() for line in lines[1:3]]
    assert header[:3] == ["epoch", "batches", "samples"]
    samples_per_epoch = len(sets["a_ids"]) + 2 * len(sets["b_ids"])
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(int(row[2]) == samples_per_epoch and int(row[5]) == 2 for row in rows)  # 2 corrupt per epoch
    assert main(["stream", "--shards", str(sets["a"]), "--weights", "1", "2"]) == 2  # clear error, no traceback


def test_streams_a_shard_set_from_the_shard_builder(shard_dir, tiny_corpus):
    stream = ShardStream(_cfg(shard_dir, num_workers=2), rank=0, world_size=1)
    ids = _ids(stream)
    assert Counter(ids) == Counter(row.id for row in tiny_corpus.good_rows)  # incl. an id with a dot
    assert stream.stats()["corrupt"] == 0


def test_fitted_bucket_plan_comes_from_the_index_durations(sets, make_shard_set):
    """The plan is fitted to the per-key lengths of the indexes (after the crop, weighted by the mix),
    computed here from the written durations; an index without lengths falls back to uniform edges."""
    directory, written = make_shard_set("fit", [5, 7, 3, 6], seed=6)
    durations = np.array(list(written.values()))  # as written, in key order
    plain = ShardStream(_cfg(directory, crop=CropConfig(policy="none"), num_buckets=4), rank=0, world_size=1)
    assert plain.state_dict()["plan"]["buckets"]["edges_seconds"] == pytest.approx(
        fitted_edges(durations, np.ones(21), 4))
    crop = CropConfig(crop_above_seconds=0.6, min_seconds=0.3, max_seconds=0.5)
    cropped = ShardStream(_cfg(directory, crop=crop, num_buckets=4), rank=0, world_size=1)
    long = durations > 0.6
    spread = 0.3 + 0.2 * (np.arange(64) + 0.5) / 64
    expected = fitted_edges(np.concatenate([durations[~long], spread]),
                            np.concatenate([np.ones((~long).sum()), np.full(64, long.sum() / 64)]), 4)
    assert cropped.state_dict()["plan"]["buckets"]["edges_seconds"] == pytest.approx(expected)
    other_dir, other = make_shard_set("fit_long", [4, 4], seconds=(1.0, 3.0), seed=7)
    mixed = ShardStream(_cfg(directory, other_dir, weights=[3.0, 0.5], crop=CropConfig(policy="none"), num_buckets=5),
                        rank=0, world_size=1)
    assert mixed.state_dict()["plan"]["buckets"]["edges_seconds"] == pytest.approx(fitted_edges(
        np.concatenate([durations, list(other.values())]), np.array([3.0] * 21 + [0.5] * 8), 5))

    old_dir, _ = make_shard_set("old", [4, 4], seed=5, list_lengths=False)
    with pytest.warns(UserWarning, match="old.*no per-sample durations"):
        old = ShardStream(_cfg(old_dir, num_buckets=4), rank=0, world_size=1)
    assert old.state_dict()["plan"]["buckets"]["edges_seconds"] == pytest.approx([3.25, 6.5, 9.75])  # 13 s / 4
    assert Counter(_ids(old)) == Counter(_ids(ShardStream(_cfg(old_dir, bucket_policy="uniform"), rank=0,
                                                          world_size=1)))


def test_resume_batches_with_the_saved_bucket_plan(sets):
    """The bucket plan is part of the saved state: a run resumed with a config that would fit other
    buckets still hands out the uninterrupted batches of the epoch, then uses its own plan."""
    full = _batch_ids(_stream(sets, num_workers=2, num_buckets=6))
    first = _stream(sets, num_workers=2, num_buckets=6)
    before = _batch_ids(first, limit=3)
    other = _stream(sets, first.state_dict(), num_workers=2, num_buckets=2)
    assert before + _batch_ids(other) == full
    other.set_epoch(4)
    assert other.state_dict()["plan"]["buckets"] == _stream(sets, num_workers=2, num_buckets=2).state_dict()[
        "plan"]["buckets"]
    # a version 2 state (no bucket plan) was batched with uniform edges: resumed with them
    legacy = _stream(sets, num_workers=2, bucket_policy="uniform")
    old_before = _batch_ids(legacy, limit=2)
    state = legacy.state_dict()
    state["version"] = 2
    del state["plan"]["buckets"]
    assert old_before + _batch_ids(_stream(sets, state, num_workers=2)) == _batch_ids(
        _stream(sets, num_workers=2, bucket_policy="uniform"))


def test_a_resumed_stream_saves_the_bucket_plan_it_batches_with(sets):
    """A stream resumed with another ``num_buckets`` batches with the saved plan and saves that plan
    again, not the one its config fits: interrupted once more and resumed, it still hands out the
    rest of the uninterrupted epoch."""
    full = _batch_ids(_stream(sets, num_buckets=6))
    first = _stream(sets, num_buckets=6)
    before = _batch_ids(first, limit=2)
    second = _stream(sets, first.state_dict(), num_buckets=2)
    middle = _batch_ids(second, limit=2)
    assert before + middle + _batch_ids(_stream(sets, second.state_dict(), num_buckets=2)) == full


def test_antideepfake_policy_batches_by_count_on_the_source_duration(sets):
    """AD's rule in the stream: a batch holds int(max_batch_seconds / edge) samples of one bucket,
    chosen by the duration before cropping; resumed exactly like the padded rule."""
    crop = CropConfig(crop_above_seconds=0.6, min_seconds=0.3, max_seconds=0.5)
    options = dict(bucket_policy="antideepfake", max_batch_seconds=8.0, num_buckets=4, crop=crop, num_workers=2)
    plan = antideepfake_plan(4, 8.0, 16)
    stream = _stream(sets, **options)
    batches, partial = [], 0
    for batch in stream:
        buckets = {int(np.searchsorted(plan.edges_seconds, meta["duration_s"], side="left")) for meta in batch.meta}
        assert len(buckets) == 1  # the source duration picks the bucket (the lengths are cropped)
        partial += len(batch) != plan.batch_sizes[buckets.pop()]
        batches.append(batch.ids)
    assert partial <= 2 * (len(plan.edges_seconds) + 1)  # the final flush of each bucket, per worker
    stop = len(batches) // 2
    first = _stream(sets, **options)
    before = _batch_ids(first, limit=stop)
    assert before + _batch_ids(_stream(sets, first.state_dict(), **options)) == batches


def test_delivered_lengths_follow_the_crop():
    seconds = np.array([1.0, 5.0, 20.0, 30.0])
    lengths, weights = delivered_lengths(seconds, CropConfig(), spread=4)
    assert lengths.tolist() == pytest.approx([1.0, 5.0, 10.375, 11.125, 11.875, 12.625])
    assert weights.tolist() == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.5])
    lengths, weights = delivered_lengths(seconds, CropConfig(policy="fixed", fixed_seconds=4.0))
    assert lengths.tolist() == [1.0, 4.0, 4.0, 4.0] and weights.tolist() == [1, 1, 1, 1]
    assert delivered_lengths(seconds, CropConfig(policy="none"))[0].tolist() == seconds.tolist()


def test_workers_reuse_batch_buffers_but_never_one_that_is_still_referenced(sets):
    """Workers collate into shared buffers that come back once nothing refers to their batch. Over
    three epochs the consumer drops most batches (their buffers are reused), keeps some whole and
    keeps only a view of others; every kept sample still holds its own audio at the end, and the
    padding of every batch is zero (one bucket: rows of different lengths over a reused buffer)."""
    reference = _reference_waves(sets["a"])
    stream = ShardStream(_cfg(sets["a"], num_workers=2, max_batch_seconds=3.0, num_buckets=1), rank=0, world_size=1)
    kept_batches, kept_views, buffers, batches = [], [], Counter(), 0
    for epoch in range(3):
        stream.set_epoch(epoch)
        for batch in stream:
            buffers[batch.waveforms.data_ptr()] += 1  # a slot's batches start where it is mapped
            for row, length in enumerate(batch.lengths.tolist()):
                assert float(batch.waveforms[row, length:].abs().sum()) == 0.0
            if batches % 5 == 0:
                kept_batches.append(batch)
            elif batches % 5 == 1:
                kept_views.append((batch.ids[0], int(batch.lengths[0]), batch.waveforms[0].numpy()))
            batches += 1
    stream.close()
    assert len(buffers) < batches and max(buffers.values()) > 1  # buffers were reused
    for batch in kept_batches:
        for row, sample_id in enumerate(batch.ids):
            np.testing.assert_allclose(batch.waveforms[row, : batch.lengths[row]].numpy(), reference[sample_id][0],
                                       atol=1e-6)
            assert float(batch.waveforms[row, batch.lengths[row]:].abs().sum()) == 0.0
    for sample_id, length, row in kept_views:
        np.testing.assert_allclose(row[:length], reference[sample_id][0], atol=1e-6)


@pytest.mark.timeout(120)
def test_an_assignment_larger_than_a_pipe_reaches_its_worker(make_shard_set, tmp_path):
    """A worker's assignment lists every key of its shards; with thousands it outgrows a pipe's buffer
    (64 KiB) and must be put once the worker reads its queue, in the first epoch and the next ones.
    Here the index lists 6000 keys the tar does not hold: delivered as missing."""
    directory, written = make_shard_set("wide", [3])
    wide = tmp_path / "wide"
    shutil.copytree(directory, wide)
    index = json.loads((wide / "index.json").read_text())
    absent = [f"ABSENT-{i:05d}" for i in range(6000)]
    shard = index["shards"][0]
    shard.update(keys=shard["keys"] + absent, samples=shard["samples"] + len(absent),
                 num_samples=shard["num_samples"] + [RATE_HZ] * len(absent))
    (wide / "index.json").write_text(json.dumps(index))
    stream = ShardStream(_cfg(wide, num_workers=1), rank=0, world_size=1)
    for epoch in range(2):
        stream.set_epoch(epoch)
        assert sorted(_ids(stream)) == sorted(written)
    stream.close()
    assert stream.stats()["corrupt_by_reason"] == {"missing": 2 * len(absent)}


def test_an_abandoned_epoch_leaves_the_next_one_whole(sets):
    """Batches the DataLoader drops when a new iteration starts (possibly the first batch of a
    buffer, which carries its descriptor) do not break the buffers of the next epoch."""
    reference = _reference_waves(sets["a"])
    stream = ShardStream(_cfg(sets["a"], num_workers=2, max_batch_seconds=1.5), rank=0, world_size=1)
    next(iter(stream))
    stream.set_epoch(1)
    seen = []
    for batch in stream:
        for row, sample_id in enumerate(batch.ids):
            np.testing.assert_allclose(batch.waveforms[row, : batch.lengths[row]].numpy(), reference[sample_id][0],
                                       atol=1e-6)
        seen += batch.ids
    stream.close()
    assert Counter(seen) == Counter(sets["a_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sample_found_corrupt_while_its_batch_is_filled_leaves_no_trace(make_shard_set, num_workers):
    """Audio is decoded straight into the batch's rows, after batching: a sample that fails there
    (garbage FLAC, or another length than its JSON says) is counted corrupt, the next sample takes its
    row, and the batch is no wider than its longest remaining sample (here the longest was corrupt)."""
    seconds = [0.5, 0.9, 0.3, 0.6, 0.4, 0.2, 0.45]
    directory, _ = make_shard_set(f"late-{num_workers}", [7], exact_seconds=seconds,
                                  corrupt={f"LATE-{num_workers}-0_1": "audio", f"LATE-{num_workers}-0_3": "json_says_more",
                                           f"LATE-{num_workers}-0_6": "json_says_less"})
    reference = _reference_waves(directory)
    stream = ShardStream(_cfg(directory, num_workers=num_workers, max_batch_seconds=20.0, num_buckets=1),
                         rank=0, world_size=1)
    batches = list(stream)
    stream.close()
    assert len(batches) == 1
    batch = batches[0]
    assert sorted(batch.ids) == sorted(f"LATE-{num_workers}-0_{i}" for i in (0, 2, 4, 5))
    assert batch.waveforms.shape == (4, int(0.5 * RATE_HZ))
    for row, sample_id in enumerate(batch.ids):
        np.testing.assert_array_equal(batch.waveforms[row, : batch.lengths[row]].numpy(), reference[sample_id][0])
        assert float(batch.waveforms[row, batch.lengths[row]:].abs().sum()) == 0.0
    assert stream.stats()["corrupt_by_reason"] == {"audio": 3}


def test_batches_beyond_the_buffers_come_in_fresh_ones(make_shard_set):
    """A batch larger than a worker's buffers (one 2.5 s sample over a 1 s budget) and batches kept
    while a worker's buffers are all held (every batch of the epoch is kept) travel in fresh shared
    buffers, and arrive whole."""
    seconds = [0.3, 2.5] + [0.2] * 38
    directory, _ = make_shard_set("fresh", [20, 20], exact_seconds=seconds)
    reference = _reference_waves(directory)
    stream = ShardStream(_cfg(directory, num_workers=2, max_batch_seconds=1.0, max_batch_size=2), rank=0,
                         world_size=1)
    batches = list(stream)
    stream.close()
    assert len(batches) > 2 * 8  # more than both workers' buffers
    assert max(int(b.lengths.max()) for b in batches) == int(2.5 * RATE_HZ)
    assert Counter(i for b in batches for i in b.ids) == Counter(set(reference))
    for batch in batches:
        for row, sample_id in enumerate(batch.ids):
            np.testing.assert_array_equal(batch.waveforms[row, : batch.lengths[row]].numpy(), reference[sample_id][0])
