"""The batch every consumer (train step, eval, embed) receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """Zero-padded waveforms with their true lengths; padding must be masked by every consumer.

    ``waveforms [B, T] float32``, ``lengths [B] int64`` (samples), ``labels [B] int64`` (1 = real),
    ``ids``: sample ids, ``meta``: the per-sample JSON metadata from the shard, ``repeats``: which
    read of its shard within the epoch delivered each sample (0 = the first; a set weight >= 2
    reads a shard more than once; empty = all 0), so per-read randomness (RawBoost) differs between
    the repeats of one file as the crop does.
    A batch with ``B == 0`` is a *join* batch: the rank has run out of data this epoch but must still
    take part in collectives (see ``posttrain.data.stream``).
    """

    waveforms: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    ids: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.waveforms.shape[0])

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return Batch(
            waveforms=self.waveforms.to(device, non_blocking=non_blocking),
            lengths=self.lengths.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            ids=self.ids,
            meta=self.meta,
            repeats=self.repeats,
        )

    @staticmethod
    def collate(waveforms: list[torch.Tensor], labels: list[int], ids: list[str],
                meta: list[dict[str, Any]], repeats: list[int] | None = None) -> "Batch":
        lengths = torch.tensor([w.numel() for w in waveforms], dtype=torch.long)
        width = int(lengths.max()) if len(waveforms) else 0
        padded = torch.zeros(len(waveforms), width, dtype=torch.float32)
        for row, wave in enumerate(waveforms):
            padded[row, : wave.numel()] = wave
        return Batch(padded, lengths, torch.tensor(labels, dtype=torch.long), list(ids), list(meta),
                     list(repeats or []))

    @staticmethod
    def empty() -> "Batch":
        return Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def normalize_waveforms(waveforms: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-utterance zero mean / unit variance over the valid samples; padding stays zero.

    ``eps`` matches transformers' ``Wav2Vec2FeatureExtractor(do_normalize=True)``, so a published model
    sees the same input through ``pipeline("audio-classification")`` as during training.
    """
    mask = (torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]).to(waveforms.dtype)
    count = lengths.clamp(min=1).to(waveforms.dtype)[:, None]
    mean = (waveforms * mask).sum(dim=1, keepdim=True) / count
    centred = (waveforms - mean) * mask
    variance = (centred**2).sum(dim=1, keepdim=True) / count
    return centred / torch.sqrt(variance + eps)
