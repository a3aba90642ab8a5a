"""Dynamic batches bounded by padded audio seconds, with duration buckets to keep padding low.

A batch's cost is counted as its *padded* size, ``batch_size x longest length``: that is what the
encoder actually processes, so bounding it bounds activation memory. Samples of similar duration
share a bucket (uniform duration edges, as in the AntiDeepfake recipe's 20 buckets), which keeps the
padding fraction small without sorting the whole stream.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


def bucket_edges(num_buckets: int, max_seconds: float) -> list[float]:
    """Upper duration edges of ``num_buckets`` uniform buckets over ``(0, max_seconds]``; longer
    items go to the last bucket."""
    if num_buckets < 1 or max_seconds <= 0:
        raise ValueError(f"need num_buckets >= 1 and max_seconds > 0, got {num_buckets}, {max_seconds}")
    width = max_seconds / num_buckets
    return [width * (i + 1) for i in range(num_buckets - 1)]


@dataclass
class _Bucket(Generic[Item]):
    items: list[Item] = field(default_factory=list)
    longest: int = 0  # samples


def batch_by_seconds(items: Iterable[Item], length_of: Callable[[Item], int], *, sample_rate_hz: int,
                     max_batch_seconds: float, max_batch_size: int,
                     edges_seconds: list[float]) -> Iterator[list[Item]]:
    """Group ``items`` into lists whose padded size ``len(list) x max(length)`` stays within
    ``max_batch_seconds`` and whose size stays within ``max_batch_size``.

    Each item goes to the bucket of its duration (``edges_seconds`` are the bucket upper edges); a
    bucket is emitted just before an item would break its bound. An item longer than
    ``max_batch_seconds`` on its own is emitted as a batch of one (it cannot be split). At the end
    every non-empty bucket is flushed. Every item is emitted exactly once.

    Resumable: a bucket's batches depend only on its own items since its last batch, so running
    again on the input minus the items of the first ``k`` batches (in the same order) yields
    exactly batches ``k+1, ...`` (the loader's exact resume relies on this).
    """
    budget_samples = max_batch_seconds * sample_rate_hz
    edges_samples = [edge * sample_rate_hz for edge in edges_seconds]
    buckets: list[_Bucket[Item]] = [_Bucket() for _ in range(len(edges_samples) + 1)]
    for item in items:
        length = length_of(item)
        bucket = buckets[bisect.bisect_left(edges_samples, length)]
        longest = max(bucket.longest, length)
        if bucket.items and (len(bucket.items) + 1 > max_batch_size
                             or (len(bucket.items) + 1) * longest > budget_samples):
            yield bucket.items
            bucket.items, bucket.longest = [], 0
            longest = length
        bucket.items.append(item)
        bucket.longest = longest
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
