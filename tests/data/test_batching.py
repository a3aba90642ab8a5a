from collections import Counter

import numpy as np
import pytest

from posttrain.data.batching import PaddingMeter, batch_by_seconds, bucket_edges

RATE_HZ = 100  # a small rate keeps the arithmetic readable; nothing depends on 16 kHz


def _batches(lengths, *, max_seconds=10.0, max_size=64, num_buckets=20, longest_seconds=2.0, items=None):
    items = list(enumerate(lengths)) if items is None else items
    return list(batch_by_seconds(items, lambda item: item[1], sample_rate_hz=RATE_HZ,
                                 max_batch_seconds=max_seconds, max_batch_size=max_size,
                                 edges_seconds=bucket_edges(num_buckets, longest_seconds)))


def test_bucket_edges_are_uniform():
    assert bucket_edges(4, 2.0) == pytest.approx([0.5, 1.0, 1.5])
    assert bucket_edges(1, 13.0) == []
    with pytest.raises(ValueError):
        bucket_edges(0, 1.0)


def test_batches_bound_padded_seconds_and_size_and_emit_each_item_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=500).tolist()  # 0.1 .. 2 s
    batches = _batches(lengths, max_seconds=6.0, max_size=8)
    for batch in batches:
        width = max(length for _, length in batch)
        assert len(batch) * width <= 6.0 * RATE_HZ
        assert 1 <= len(batch) <= 8
    assert Counter(index for batch in batches for index, _ in batch) == Counter(range(len(lengths)))


def test_rerun_without_the_first_batches_items_repeats_the_remaining_batches():
    """What an exact resume needs: the items of the batches already handed out are dropped and the
    rest (partly filled buckets included) is fed again in its original order."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(10, 200, size=300).tolist() + [900]  # one item over the budget
    options = dict(max_seconds=6.0, max_size=8, num_buckets=4, longest_seconds=20.0)
    batches = _batches(lengths, **options)
    for handed_out in (1, 7, len(batches) // 2, len(batches) - 1):
        done = {index for batch in batches[:handed_out] for index, _ in batch}
        rest = [(index, length) for index, length in enumerate(lengths) if index not in done]
        assert _batches(None, items=rest, **options) == batches[handed_out:], handed_out


def test_item_longer_than_budget_becomes_a_batch_of_one():
    batches = _batches([50, 1500, 60, 40], max_seconds=5.0, longest_seconds=20.0)
    assert [(1, 1500)] in batches
    assert sorted(i for batch in batches for i, _ in batch) == [0, 1, 2, 3]


def test_buckets_reduce_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 200, size=2000).tolist()

    def padding(num_buckets):
        meter = PaddingMeter()
        for batch in _batches(lengths, max_seconds=20.0, num_buckets=num_buckets):
            meter.add(length for _, length in batch)
        return meter.fraction

    # one bucket: a batch's width is the max of ~random lengths, so padding is large (~0.4);
    # 20 buckets hold lengths within 0.1 s of each other
    assert padding(1) > 0.3
    assert padding(20) < 0.1


def test_padding_meter_matches_direct_count():
    meter = PaddingMeter()
    meter.add([3, 5])
    meter.add([4])
    meter.add([])
    # padded: 2 x 5 + 1 x 4 = 14, valid 12
    assert meter.fraction == pytest.approx(1 - 12 / 14)
    assert PaddingMeter().fraction == 0.0
