"""Config sections of the data: the crop policy, a streaming loader, the train and valid sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.config.schema import SAMPLE_RATE_HZ, Section, require, require_choice



@dataclass
class CropConfig(Section):
    """How training/validation audio is cut. ``antideepfake``: files longer than
    ``crop_above_seconds`` get one random crop of uniform length in [min_seconds, max_seconds]."""

    policy: Literal["antideepfake", "fixed", "none"] = "antideepfake"
    crop_above_seconds: float = 13.0
    min_seconds: float = 10.0
    max_seconds: float = 13.0
    fixed_seconds: float = 4.0

    def validate(self) -> None:
        require_choice(self.policy, "policy", ["antideepfake", "fixed", "none"])
        require(self.min_seconds > 0, "min_seconds", "must be > 0")
        require(self.max_seconds >= self.min_seconds, "max_seconds", "must be >= min_seconds")
        require(self.fixed_seconds > 0, "fixed_seconds", "must be > 0")


@dataclass
class StreamConfig(Section):
    """Streaming loader over WebDataset shard sets (see ``posttrain.data.stream``)."""

    shards: list[str] = field(default_factory=list)  # shard directories (each with index.json)
    weights: list[float] = field(default_factory=list)  # per shard set; empty = all 1.0
    sample_rate_hz: int = SAMPLE_RATE_HZ
    max_batch_seconds: float = 100.0  # padded audio seconds (B x longest) per batch per rank
    max_batch_size: int = 64
    num_buckets: int = 20
    # fitted: edges fitted to the index durations (low padding); uniform: equal widths; antideepfake:
    # AD's log-normal edges with int(max_batch_seconds / edge) items per bucket (see data/batching.py)
    bucket_policy: Literal["fitted", "uniform", "antideepfake"] = "fitted"
    shuffle_buffer: int = 1000  # samples: a sample leaves the read order by at most this many places
    interleave_shards: int = 4  # shards each worker reads at once, so every batch mixes several shards
    num_workers: int = 2
    # fork starts workers in milliseconds (they only read and decode); spawn re-imports torch per worker
    worker_start_method: Literal["fork", "spawn", "forkserver"] = "fork"
    seed: int = 1234
    crop: CropConfig = field(default_factory=CropConfig)
    # shard sets behind URLs or pipe: commands: failures in a row per file, first back-off (doubling)
    read_attempts: int = 8
    read_backoff_seconds: float = 0.5
    read_timeout_seconds: float = 60.0  # an HTTP connection silent this long is dropped and retried

    def validate(self) -> None:
        require(not self.weights or len(self.weights) == len(self.shards), "weights",
                f"needs one weight per shard set ({len(self.shards)}), got {len(self.weights)}")
        require(all(w > 0 for w in self.weights), "weights", "must all be > 0")
        require(self.sample_rate_hz > 0, "sample_rate_hz", "must be > 0")
        require(self.max_batch_seconds > 0, "max_batch_seconds", "must be > 0")
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        require(self.num_buckets >= 1, "num_buckets", "must be >= 1")
        require_choice(self.bucket_policy, "bucket_policy", ["fitted", "uniform", "antideepfake"])
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        require(self.interleave_shards >= 1, "interleave_shards", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require_choice(self.worker_start_method, "worker_start_method", ["fork", "spawn", "forkserver"])
        require(self.read_attempts >= 1, "read_attempts", "must be >= 1")
        require(self.read_backoff_seconds >= 0, "read_backoff_seconds", "must be >= 0")
        require(self.read_timeout_seconds > 0, "read_timeout_seconds", "must be > 0")


@dataclass
class DataConfig(Section):
    train: StreamConfig = field(default_factory=StreamConfig)
    valid: StreamConfig = field(default_factory=lambda: StreamConfig(shuffle_buffer=0, num_workers=0))
