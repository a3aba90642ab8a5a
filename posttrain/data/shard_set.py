"""A shard set as the loader sees it: what its ``index.json`` lists, loaded once per stream.

The loader plans an epoch before reading a byte, so everything it plans with comes from the index:
each shard's sample count and seconds (to split and balance the work), its keys in tar order (the
positions of the loader state index into them), each key's length (to fit the bucket plan) and the
tar's bytes (a network stream that breaks is resumed at the byte where it broke). How the files are
fetched, with which retries, is ``posttrain.data.locations``; the format is ``posttrain.data.shards``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.config import StreamConfig
from posttrain.data import locations
from posttrain.data.locations import RetryPolicy
from posttrain.data.shards import INDEX_NAME, ShardFormatError, load_index, shard_paths


def retry_policy(cfg: StreamConfig) -> RetryPolicy:
    """The retries of a stream's ``read_*`` settings, for its index and its tars alike."""
    return RetryPolicy(cfg.read_attempts, cfg.read_backoff_seconds, timeout_seconds=cfg.read_timeout_seconds)


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int
    seconds: float
    keys: tuple[str, ...]
    num_samples: tuple[int, ...] | None  # audio samples per key; None in an index built before they were listed
    bytes: int  # of the tar: a network stream that ends before it broke and is resumed


@dataclass(frozen=True)
class ShardSet:
    directory: str
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def durations_seconds(self, sample_rate_hz: int) -> np.ndarray | None:
        """Every sample's duration, or None when the index does not list them."""
        if any(shard.num_samples is None for shard in self.shards):
            return None
        lengths = [np.asarray(shard.num_samples, dtype=np.float64) for shard in self.shards]
        return np.concatenate(lengths) / sample_rate_hz if lengths else np.zeros(0)

    @staticmethod
    def load(directory: str | Path, policy: RetryPolicy = RetryPolicy()) -> "ShardSet":
        """Read ``index.json`` (of a folder, a URL or a ``pipe:`` command, see
        ``posttrain.data.locations``); a missing local tar or an index that disagrees with itself
        raises ``ShardFormatError`` naming the file."""
        index = load_index(directory, policy)
        index_path = locations.join(str(directory), INDEX_NAME)
        local = locations.is_local(str(directory))
        paths = shard_paths(locations.local_path(str(directory)), index) if local else [
            locations.join(str(directory), entry["name"]) for entry in index["shards"]]
        shards = []
        for row, (entry, path) in enumerate(zip(index["shards"], paths)):
            if local and not path.is_file():
                raise ShardFormatError(f"{index_path}: shards[{row}] {path} does not exist")
            if len(entry["keys"]) != entry["samples"]:
                raise ShardFormatError(f"{index_path}: shards[{row}] lists {len(entry['keys'])} keys "
                                       f"for {entry['samples']} samples")
            num_samples = entry.get("num_samples")
            if num_samples is not None and len(num_samples) != entry["samples"]:
                raise ShardFormatError(f"{index_path}: shards[{row}] lists {len(num_samples)} durations "
                                       f"for {entry['samples']} samples")
            shards.append(ShardInfo(str(path), int(entry["samples"]), float(entry["seconds"]),
                                    tuple(entry["keys"]), None if num_samples is None else tuple(num_samples),
                                    int(entry["bytes"])))
        return ShardSet(str(directory), tuple(shards))
