"""The batch every consumer (train step, eval, embed) receives."""

from __future__ import annotations

import dataclasses
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
    the repeats of one file as the crop does. ``offsets_samples``: the sample of its source file at
    which each row's window starts (0 when the file was not cropped; empty = all 0), so a row can be
    traced back to the stretch of the file it holds.
    A batch with ``B == 0`` is a *join* batch: the rank has run out of data this epoch but must still
    take part in collectives (see ``posttrain.data.stream``).
    """

    waveforms: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    ids: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    offsets_samples: list[int] = field(default_factory=list)
    # (samples, audio samples) of this batch's slot summed over all ranks, when the loader already
    # agreed on them (``posttrain.data.stream``: one collective per slot carries the join flag and
    # these counts), so the train step needs no collective of its own before the forward
    global_counts: tuple[int, int] | None = None

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
            offsets_samples=self.offsets_samples,
            global_counts=self.global_counts,
        )

    def pin_memory(self) -> "Batch":
        """Page-locked host copies, so that ``to(cuda, non_blocking=True)`` is a real asynchronous copy."""
        return dataclasses.replace(self, waveforms=self.waveforms.pin_memory(), lengths=self.lengths.pin_memory(),
                                   labels=self.labels.pin_memory())

    @staticmethod
    def collate(waveforms: list[torch.Tensor], labels: list[int], ids: list[str], meta: list[dict[str, Any]],
                repeats: list[int] | None = None) -> "Batch":
        """Zero-pad ``waveforms`` into ``[B, longest]`` (the training loader decodes straight into its
        batches instead, see ``posttrain.data.stream``)."""
        lengths = [w.numel() for w in waveforms]
        padded = torch.empty(len(waveforms), max(lengths, default=0), dtype=torch.float32)
        for row, (wave, length) in enumerate(zip(waveforms, lengths)):
            padded[row, :length] = wave
            padded[row, length:] = 0.0
        return Batch(padded, torch.tensor(lengths, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                     list(ids), list(meta), list(repeats or []))

    @staticmethod
    def empty(global_counts: tuple[int, int] | None = None) -> "Batch":
        return Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                     global_counts=global_counts)


# The per-utterance normalisation's eps, which a model must be scored with as it was trained
# (``Detector.input_eps`` reads it from the model's config):
TRANSFORMERS_INPUT_EPS = 1e-7  # transformers' Wav2Vec2FeatureExtractor (hard-coded): posttrain's models
ANTIDEEPFAKE_INPUT_EPS = 1e-5  # AntiDeepfake's F.layer_norm(wav, wav.shape): its releases and their offspring


def normalize_waveforms(waveforms: torch.Tensor, lengths: torch.Tensor,
                        eps: float = TRANSFORMERS_INPUT_EPS) -> torch.Tensor:
    """Per-utterance zero mean / unit variance over the valid samples, ``(x - mean) / sqrt(var + eps)``;
    padding stays zero. The one normalisation of model inputs (training, validation, scoring,
    sharpness, export checks); use the model's own ``eps`` (``Detector.normalise``).

    The default eps is transformers' ``Wav2Vec2FeatureExtractor(do_normalize=True)``, so a posttrain
    model sees the same input through ``pipeline("audio-classification")`` as during training; the
    two eps values differ only where the variance is comparable to them (quiet input).
    """
    mask = (torch.arange(waveforms.shape[1], device=waveforms.device)[None, :] < lengths[:, None]).to(waveforms.dtype)
    count = lengths.clamp(min=1).to(waveforms.dtype)[:, None]
    mean = (waveforms * mask).sum(dim=1, keepdim=True) / count
    centred = (waveforms - mean) * mask
    variance = (centred**2).sum(dim=1, keepdim=True) / count
    return centred / torch.sqrt(variance + eps)
