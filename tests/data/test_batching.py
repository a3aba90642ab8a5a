import itertools
from collections import Counter

import numpy as np
import pytest

from posttrain.data.batching import (PaddingMeter, antideepfake_plan, batch_by_seconds, bucket_edges, fitted_edges,
                                     lognormal_edges)

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


def test_lognormal_edges_and_antideepfake_plan_match_speechbrain():
    """SpeechBrain's DynamicBatchSampler (AD's sampler): log-normal (s=1) quantiles at i/(n+1),
    scaled so the last is max_batch_length; bucket i holds int(max_batch_length / edge_i) items."""
    from scipy.stats import lognorm

    n, budget = 20, 100.0
    quantiles = lognorm.ppf(np.linspace(1 / (n + 1), n / (n + 1), n), 1)
    expected = quantiles * budget / quantiles[-1]
    assert lognormal_edges(n, budget) == pytest.approx(expected.tolist(), rel=1e-9)
    plan = antideepfake_plan(n, budget, max_batch_size=64)
    assert plan.batch_sizes == tuple(max(1, int(budget / edge)) for edge in expected) + (1,)
    assert plan.batch_sizes[0] == 28 and plan.on_source_length  # 100 s over the first edge, 3.56 s
    assert antideepfake_plan(n, budget, max_batch_size=10).batch_sizes[0] == 10  # max_batch_ex


def test_count_batches_bucket_on_the_source_length():
    """AD's rule: an item's bucket comes from its length before cropping, and a bucket is emitted
    as soon as it holds its count; the padded budget plays no part."""
    rng = np.random.default_rng(3)
    source = rng.integers(10, 400, size=600)
    cropped = np.minimum(source, 150)
    items = list(zip(range(600), cropped.tolist(), source.tolist()))
    edges, sizes = [100 / RATE_HZ, 250 / RATE_HZ], [5, 3, 2]

    def run(stream):
        return list(batch_by_seconds(stream, lambda item: item[1], sample_rate_hz=RATE_HZ, max_batch_seconds=0.1,
                                     max_batch_size=64, edges_seconds=edges, batch_sizes=sizes,
                                     bucket_length_of=lambda item: item[2]))

    batches = run(items)
    bucket_of = [int(np.searchsorted([100, 250], s, side="left")) for s in source]
    full = [batch for batch in batches if len({bucket_of[i] for i, _, _ in batch}) == 1
            and len(batch) == sizes[bucket_of[batch[0][0]]]]
    assert len(batches) - len(full) <= 3  # only the final flush of each bucket is partial
    assert sum(len(b) for b in batches) == 600 and len({i for b in batches for i, _, _ in b}) == 600
    # an item of source length 260 cropped to 150 sits with source-long items, not with 150-long ones
    assert all(len({bucket_of[i] for i, _, _ in batch}) == 1 for batch in batches)
    done = {i for batch in batches[:10] for i, _, _ in batch}  # resumable like the padded rule
    assert run([item for item in items if item[0] not in done]) == batches[10:]


def _padded_cost(lengths, weights, edges):
    """Independent reference of the objective: each item costs its bucket's upper edge (the last
    bucket's is the longest length)."""
    uppers = list(edges) + [max(lengths)]
    return sum(w * uppers[int(np.searchsorted(edges, x, side="left"))] for x, w in zip(lengths, weights))


def test_fitted_edges_minimise_the_padded_cost_exactly_on_small_inputs():
    rng = np.random.default_rng(4)
    for trial in range(5):
        lengths = np.round(rng.lognormal(0, 0.8, size=9), 2)
        weights = rng.uniform(0.2, 2.0, size=9)
        for num_buckets in (1, 2, 3, 4):
            edges = fitted_edges(lengths, weights, num_buckets)
            assert len(edges) <= num_buckets - 1 and edges == sorted(edges)
            inner = sorted(set(lengths.tolist()) - {lengths.max()})
            best = min(_padded_cost(lengths, weights, list(c)) for k in range(num_buckets)
                       for c in itertools.combinations(inner, k))
            assert _padded_cost(lengths, weights, edges) == pytest.approx(best), (trial, num_buckets)


@pytest.mark.parametrize("corpus", ["short", "long-tailed"])
@pytest.mark.parametrize("crop", [False, True])
def test_fitted_edges_keep_padding_under_ten_percent(corpus, crop):
    """The issue's goal on a short-clip corpus (p50 0.6 s, max 3.5 s) and a long-tailed one
    (p50 4 s, up to 120 s), whole or cropped as AntiDeepfake crops (> 13 s -> 10-13 s); uniform
    edges waste far more on the short clips."""
    rng = np.random.default_rng(5)
    if corpus == "short":
        seconds = np.clip(rng.lognormal(np.log(0.6), 0.5, 8000), 0.1, 3.5)
    else:
        seconds = np.clip(rng.lognormal(np.log(4.0), 1.0, 8000), 0.3, 120.0)
    if crop:
        long = seconds > 13
        seconds[long] = rng.uniform(10, 13, long.sum())
    lengths = np.round(seconds * RATE_HZ).astype(int)

    def padding(edges):
        meter = PaddingMeter()
        items = list(enumerate(lengths.tolist()))
        for batch in batch_by_seconds(items, lambda item: item[1], sample_rate_hz=RATE_HZ, max_batch_seconds=100.0,
                                      max_batch_size=64, edges_seconds=edges):
            meter.add(length for _, length in batch)
        return meter.fraction

    fitted = padding(fitted_edges(lengths / RATE_HZ, np.ones(lengths.size), 20))
    assert fitted <= 0.10
    if corpus == "short":
        assert padding(bucket_edges(20, 13.0 if crop else 100.0)) > 0.25
