"""Dynamic batches bounded by padded audio seconds, with duration buckets to keep padding low.

A batch's cost is counted as its *padded* size, ``batch_size x longest length``: that is what the
encoder actually processes, so bounding it bounds activation memory. Samples of similar duration
share a bucket, which keeps the padding fraction small without sorting the whole stream. Where the
bucket edges lie is the *bucket policy* (``StreamConfig.bucket_policy``):

``fitted`` (default)
    Edges fitted to the data: from the per-sample durations in the shard indexes (after the crop
    policy, weighted by the mix), the ``num_buckets`` buckets that minimise the padded seconds of an
    epoch when every batch is as wide as its bucket's upper edge (``fitted_edges``). A bucket is
    emitted just before its padded size would exceed the budget.
``uniform``
    ``num_buckets`` equal-width buckets over ``(0, longest]``: most clips of a real, skewed duration
    distribution share the first bucket (61-63 % padding measured on a short-clip corpus).
``antideepfake``
    AntiDeepfake's sampler (SpeechBrain's ``DynamicBatchSampler`` with ``num_buckets`` and
    ``max_batch_length``): ``num_buckets`` edges at the log-normal quantiles
    ``exp(Phi^-1(i / (n + 1)))``, ``i = 1..n``, scaled so the last edge is ``max_batch_seconds``,
    plus an open bucket above it; bucket ``i`` is emitted when it holds ``int(max_batch_seconds /
    edge_i)`` items (at least 1, at most ``max_batch_size``; 1 in the open bucket), and a sample's
    bucket is chosen by its duration *before* cropping. AD shuffles the whole dataset and then permutes
    the batches; a stream buckets in read order instead, so the batches' membership follows the same
    rule but not the same draw.

The loader derives its plan once per stream from the indexes (``bucket_plan``, on the lengths the
crop policy delivers, ``delivered_lengths``) and saves it in its state, so a resumed epoch batches
with the buckets it started with even where the config would now fit others.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Generic, TypeVar

import numpy as np

from posttrain.config import CropConfig, StreamConfig
from posttrain.data.shard_set import ShardSet

Item = TypeVar("Item")

BUCKET_POLICIES = ("fitted", "uniform", "antideepfake")


def bucket_edges(num_buckets: int, max_seconds: float) -> list[float]:
    """Upper duration edges of ``num_buckets`` uniform buckets over ``(0, max_seconds]``; longer
    items go to the last bucket."""
    if num_buckets < 1 or max_seconds <= 0:
        raise ValueError(f"need num_buckets >= 1 and max_seconds > 0, got {num_buckets}, {max_seconds}")
    width = max_seconds / num_buckets
    return [width * (i + 1) for i in range(num_buckets - 1)]


def lognormal_edges(num_buckets: int, max_batch_seconds: float) -> list[float]:
    """SpeechBrain's "warped" edges (AntiDeepfake's buckets): log-normal (sigma 1) quantiles at
    ``i / (num_buckets + 1)``, scaled so the largest is ``max_batch_seconds``."""
    if num_buckets < 1 or max_batch_seconds <= 0:
        raise ValueError(f"need num_buckets >= 1 and max_batch_seconds > 0, got {num_buckets}, {max_batch_seconds}")
    normal = NormalDist()
    quantiles = [np.exp(normal.inv_cdf(i / (num_buckets + 1))) for i in range(1, num_buckets + 1)]
    return [float(q * max_batch_seconds / quantiles[-1]) for q in quantiles]


def fitted_edges(lengths_seconds: np.ndarray, weights: np.ndarray, num_buckets: int,
                 candidates: int = 256) -> list[float]:
    """Upper edges of at most ``num_buckets`` buckets (the last one open) that minimise
    ``sum over buckets of weight(bucket) x upper edge``: the padded seconds of an epoch whose batches
    are each as wide as their bucket's edge, a bound the real batches stay under.

    Edges are chosen among ``candidates`` weighted quantiles of the lengths (the largest length is
    always one), by dynamic programming over (buckets used, last edge): exact on that grid.
    """
    lengths_seconds, weights = np.asarray(lengths_seconds, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if num_buckets < 1 or lengths_seconds.size == 0 or lengths_seconds.shape != weights.shape:
        raise ValueError(f"need num_buckets >= 1 and one weight per length, got {num_buckets}, "
                         f"{lengths_seconds.shape} lengths, {weights.shape} weights")
    order = np.argsort(lengths_seconds, kind="stable")
    lengths, cumulative = lengths_seconds[order], np.cumsum(weights[order])
    grid = cumulative[-1] * np.arange(1, candidates + 1) / candidates
    upper = np.unique(lengths[np.minimum(np.searchsorted(cumulative, grid), lengths.size - 1)])
    mass = cumulative[np.searchsorted(lengths, upper, side="right") - 1]  # weight of lengths <= upper[j]
    # cost[j]: the best total with the current number of buckets whose last edge is upper[j];
    # bucket (upper[i], upper[j]] costs (mass[j] - mass[i]) * upper[j]
    cost, choices = mass * upper, []
    below = np.tril(np.ones((upper.size, upper.size), dtype=bool), k=-1)  # [j, i]: i < j
    for _ in range(1, min(num_buckets, upper.size)):
        options = np.where(below, cost[None, :] + (mass[:, None] - mass[None, :]) * upper[:, None], np.inf)
        previous = options.argmin(axis=1)
        improved = options[np.arange(upper.size), previous] < cost
        choices.append(np.where(improved, previous, -1))
        cost = np.where(improved, options[np.arange(upper.size), previous], cost)
    edges, last = [], upper.size - 1
    for choice in reversed(choices):  # walk back from the largest length
        if choice[last] >= 0:
            last = int(choice[last])
            edges.append(float(upper[last]))
    return sorted(edges)


@dataclass(frozen=True)
class BucketPlan:
    """Where an item goes and when its bucket is emitted.

    ``edges_seconds``: the buckets' upper edges (an item longer than the last edge goes to an extra,
    open bucket). ``batch_sizes``: ``None`` to emit a bucket just before its padded size would exceed
    the budget, or one item count per bucket (``len(edges_seconds) + 1``) to emit it when it holds
    that many. ``on_source_length``: bucket by the duration before cropping (AntiDeepfake).
    """

    edges_seconds: tuple[float, ...]
    batch_sizes: tuple[int, ...] | None = None
    on_source_length: bool = False

    def __post_init__(self) -> None:
        if list(self.edges_seconds) != sorted(self.edges_seconds):
            raise ValueError(f"bucket edges must be ascending, got {self.edges_seconds}")
        if self.batch_sizes is not None and (len(self.batch_sizes) != len(self.edges_seconds) + 1
                                             or min(self.batch_sizes) < 1):
            raise ValueError(f"need {len(self.edges_seconds) + 1} batch sizes >= 1, got {self.batch_sizes}")

    def to_json(self) -> dict[str, Any]:
        return {"edges_seconds": list(self.edges_seconds), "on_source_length": self.on_source_length,
                "batch_sizes": None if self.batch_sizes is None else list(self.batch_sizes)}

    @staticmethod
    def from_json(saved: dict[str, Any]) -> "BucketPlan":
        sizes = saved.get("batch_sizes")
        return BucketPlan(tuple(saved["edges_seconds"]), None if sizes is None else tuple(sizes),
                          bool(saved.get("on_source_length", False)))


def antideepfake_plan(num_buckets: int, max_batch_seconds: float, max_batch_size: int) -> BucketPlan:
    """AntiDeepfake's buckets: log-normal edges, ``int(max_batch_seconds / edge)`` items per bucket,
    on the duration before cropping (see the module docstring)."""
    edges = lognormal_edges(num_buckets, max_batch_seconds)
    sizes = [min(max_batch_size, max(1, int(max_batch_seconds / edge))) for edge in edges] + [1]
    return BucketPlan(tuple(edges), tuple(sizes), on_source_length=True)


def delivered_lengths(seconds: np.ndarray, crop: CropConfig, spread: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, weights)``: the distribution of what the loader's crop (``read_order.crop_window``)
    makes of files of these durations. A file kept whole is itself (weight 1); the ``antideepfake``
    crop's uniform random length is ``spread`` evenly spaced lengths over [min_seconds, max_seconds]
    sharing the cropped files' weight; the ``fixed`` crop is ``fixed_seconds``."""
    if crop.policy == "antideepfake":
        cut = seconds > crop.crop_above_seconds
        spread_lengths = crop.min_seconds + (crop.max_seconds - crop.min_seconds) * (np.arange(spread) + 0.5) / spread
        return (np.concatenate([seconds[~cut], spread_lengths]),
                np.concatenate([np.ones(int((~cut).sum())), np.full(spread, cut.sum() / spread)]))
    if crop.policy == "fixed":
        seconds = np.minimum(seconds, crop.fixed_seconds)
    return seconds, np.ones(seconds.size)


def longest_delivered_seconds(cfg: StreamConfig) -> float:
    """The longest sample the crop policy delivers (``none``: the batch budget, beyond which a sample
    is a batch of its own)."""
    crop = cfg.crop
    return {"antideepfake": max(crop.crop_above_seconds, crop.max_seconds), "fixed": crop.fixed_seconds,
            "none": cfg.max_batch_seconds}[crop.policy]


def uniform_plan(cfg: StreamConfig) -> BucketPlan:
    """``num_buckets`` equal-width buckets up to the longest delivered sample."""
    return BucketPlan(tuple(bucket_edges(cfg.num_buckets, longest_delivered_seconds(cfg))))


def bucket_plan(cfg: StreamConfig, sets: list[ShardSet], weights: list[float]) -> BucketPlan:
    """The bucket plan of ``cfg.bucket_policy``. ``fitted`` needs the per-sample durations of every
    index; an index without them gets uniform edges and a warning."""
    if cfg.bucket_policy == "antideepfake":
        return antideepfake_plan(cfg.num_buckets, cfg.max_batch_seconds, cfg.max_batch_size)
    if cfg.bucket_policy == "fitted":
        durations = [shard_set.durations_seconds(cfg.sample_rate_hz) for shard_set in sets]
        if all(d is not None for d in durations) and sum(d.size for d in durations):
            parts = [delivered_lengths(d, cfg.crop) for d in durations]
            lengths = np.concatenate([part[0] for part in parts])
            mix = np.concatenate([part[1] * weight for part, weight in zip(parts, weights)])
            return BucketPlan(tuple(fitted_edges(lengths, mix, cfg.num_buckets)))
        old = [shard_set.directory for shard_set, d in zip(sets, durations) if d is None]
        warnings.warn(f"{', '.join(old)}: index.json lists no per-sample durations (built by an older "
                      f"posttrain); bucket edges fall back to uniform. Rebuild the shard set for fitted edges "
                      f"(lower padding) or set bucket_policy: uniform to silence this.", stacklevel=2)
    return uniform_plan(cfg)


@dataclass
class _Bucket(Generic[Item]):
    items: list[Item] = field(default_factory=list)
    longest: int = 0  # samples


def batch_by_seconds(items: Iterable[Item], length_of: Callable[[Item], int], *, sample_rate_hz: int,
                     max_batch_seconds: float, max_batch_size: int, edges_seconds: Sequence[float],
                     batch_sizes: Sequence[int] | None = None,
                     bucket_length_of: Callable[[Item], int] | None = None) -> Iterator[list[Item]]:
    """Group ``items`` into lists whose padded size ``len(list) x max(length)`` stays within
    ``max_batch_seconds`` and whose size stays within ``max_batch_size``.

    Each item goes to the bucket of its duration (``edges_seconds`` are the bucket upper edges;
    ``bucket_length_of`` gives the length to bucket by, default ``length_of``). Without
    ``batch_sizes`` a bucket is emitted just before an item would break its bound, and an item
    longer than ``max_batch_seconds`` on its own is emitted as a batch of one (it cannot be split);
    with ``batch_sizes`` bucket ``i`` is emitted as soon as it holds ``batch_sizes[i]`` items. At the
    end every non-empty bucket is flushed. Every item is emitted exactly once.

    Resumable: a bucket's batches depend only on its own items since its last batch, so running
    again on the input minus the items of the first ``k`` batches (in the same order) yields
    exactly batches ``k+1, ...`` (the loader's exact resume relies on this).
    """
    budget_samples = max_batch_seconds * sample_rate_hz
    edges_samples = [edge * sample_rate_hz for edge in edges_seconds]
    bucket_length_of = bucket_length_of or length_of
    buckets: list[_Bucket[Item]] = [_Bucket() for _ in range(len(edges_samples) + 1)]
    for item in items:
        length = length_of(item)
        index = bisect.bisect_left(edges_samples, bucket_length_of(item))
        bucket = buckets[index]
        longest = max(bucket.longest, length)
        if batch_sizes is None and bucket.items and (len(bucket.items) + 1 > max_batch_size
                                                     or (len(bucket.items) + 1) * longest > budget_samples):
            yield bucket.items
            bucket.items, bucket.longest = [], 0
            longest = length
        bucket.items.append(item)
        bucket.longest = longest
        if batch_sizes is not None and len(bucket.items) >= batch_sizes[index]:
            yield bucket.items
            bucket.items, bucket.longest = [], 0
    for bucket in buckets:
        if bucket.items:
            yield bucket.items


@dataclass
class PaddingMeter:
    """Running padded vs valid sample counts: ``fraction`` is the share of processed samples that
    are padding."""

    valid_samples: int = 0
    padded_samples: int = 0

    def add(self, lengths: Iterable[int]) -> None:
        lengths = list(lengths)
        self.valid_samples += sum(lengths)
        self.padded_samples += len(lengths) * max(lengths, default=0)

    @property
    def fraction(self) -> float:
        return 1.0 - self.valid_samples / self.padded_samples if self.padded_samples else 0.0
