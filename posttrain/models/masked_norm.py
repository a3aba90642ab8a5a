"""Group norm over time that sees each row's valid frames only, so padding never changes a score.

wav2vec 2.0 small (and every "group" feature extractor) normalises its first conv layer per channel
over the whole time axis. In a zero-padded batch that axis includes the padding, so a short file
scored next to a long one gets other statistics than scored alone (measured on a tiny random model:
logits move by 4.7e-2). ``MaskedGroupNorm`` takes the statistics over the frames computed from valid
samples only; a row's valid frames then equal batch 1's, and the later conv layers, the attention
mask and the masked mean never read the frames past them, so a padded batch scores as batch 1.

The module replaces the stock ``nn.GroupNorm`` in place and shares its parameters (same state-dict
keys, so checkpoints and exports are unchanged). The sample lengths of the next forward pass are set
by ``posttrain.models.detector.Detector`` through ``set_lengths`` and kept until the next call, so
that activation checkpointing recomputes the layer with the same statistics during backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` over ``[B, C, frames]`` with statistics over the first ``valid_frames[b]``
    frames of row ``b`` (all frames while no lengths are set). Frames past them are normalised with
    the same statistics; nothing downstream of a valid frame reads them."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.valid_frames: torch.Tensor | None = None  # [B] int64, set per batch
        # True while a graph exporter traces the model (``traceable_group_norm``): always the masked
        # statistics, never the all-valid fast path, whose choice depends on the data
        self.traceable = False

    @classmethod
    def replacing(cls, norm: nn.GroupNorm) -> "MaskedGroupNorm":
        """A masked twin of ``norm`` holding the very same parameter tensors."""
        masked = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
        if norm.affine:
            masked.weight, masked.bias = norm.weight, norm.bias
        return masked

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        frames = self.valid_frames
        if frames is not None and frames.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"MaskedGroupNorm: lengths set for {frames.shape[0]} rows, input has "
                               f"{hidden.shape[0]}; run the encoder through Detector.embed")
        if frames is None or (not self.traceable and bool((frames >= hidden.shape[-1]).all())):
            return super().forward(hidden)  # nothing padded: the stock kernel, bit for bit
        batch, channels, width = hidden.shape
        # fp32 statistics, as fairseq's Fp32GroupNorm and autocast's group_norm
        grouped = hidden.float().reshape(batch, self.num_groups, channels // self.num_groups, width)
        mask = (torch.arange(width, device=hidden.device)[None, :] < frames.to(hidden.device)[:, None])
        mask = mask.to(grouped.dtype)[:, None, None, :]
        count = (mask.sum(dim=-1, keepdim=True) * grouped.shape[2]).clamp(min=1.0)
        mean = (grouped * mask).sum(dim=(2, 3), keepdim=True) / count
        variance = (((grouped - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / count
        normalised = ((grouped - mean) * torch.rsqrt(variance + self.eps)).reshape(batch, channels, width)
        if self.affine:
            normalised = normalised * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        return normalised.to(hidden.dtype)


def install_masked_group_norm(encoder: nn.Module) -> MaskedGroupNorm | None:
    """Swap the group norm of a "group" feature extractor (its first conv layer) for a
    ``MaskedGroupNorm``; the installed module (or None: layer-norm extractors are per frame already)."""
    first = encoder.feature_extractor.conv_layers[0]
    norm = getattr(first, "layer_norm", None)
    if isinstance(norm, MaskedGroupNorm):
        return norm
    if not isinstance(norm, nn.GroupNorm):
        return None
    first.layer_norm = MaskedGroupNorm.replacing(norm)
    return first.layer_norm


@contextlib.contextmanager
def traceable_group_norm(encoder: nn.Module) -> Iterator[None]:
    """While inside, the encoder's ``MaskedGroupNorm`` (if any) always takes the masked statistics, so a
    graph exporter (ONNX) records one path valid for every batch; equal to the stock kernel up to rounding
    when nothing is padded."""
    norm = getattr(encoder.feature_extractor.conv_layers[0], "layer_norm", None)
    if not isinstance(norm, MaskedGroupNorm):
        yield
        return
    norm.traceable = True
    try:
        yield
    finally:
        norm.traceable = False


def first_conv_frames(encoder: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Frames of the first conv layer computed from ``lengths`` valid samples (0 when too short)."""
    conv = encoder.feature_extractor.conv_layers[0].conv
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    return (torch.div(lengths - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
