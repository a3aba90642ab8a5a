"""Analytic model FLOPs of a detector (wav2vec 2.0 / HuBERT encoder + linear head) per clip and per
audio-second, for throughput and model-FLOPs-utilisation figures.

Counted: every matrix product and convolution, at 2 FLOPs per multiply-add (the convention of
``torch.utils.flop_counter`` and of MFU papers). Not counted: norms, activations, softmax, masking,
pooling, biases: together well under 1 % of the total for every preset.

The frame count depends on the clip length (conv arithmetic, then attention is quadratic in frames),
so a per-audio-second figure assumes one clip length: ``DEFAULT_CLIP_SECONDS`` = 4 s unless told.
With 4 s clips: XLS-R 300M ~37, 1B ~103, 2B ~223 GFLOPs forward per audio-second (the published
~34 / ~96 / ~215 ignore attention and convs; see ``tests/train/test_flops.py``).

Training costs ``TRAIN_MULTIPLIER`` x forward (backward = 2 x forward); full activation recompute
(gradient checkpointing) re-runs the forward once more. MFU conventionally counts the 3x only;
``hardware`` figures include the recompute.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.models.backbones import FlopsBreakdown, backbone_of
from posttrain.models.backbones.wav2vec2 import conv_output_lengths

DEFAULT_CLIP_SECONDS = 4.0
NUM_CLASSES = 2
TRAIN_MULTIPLIER = 3.0  # forward + backward (grads w.r.t. activations and weights: 2 x forward)
RECOMPUTE_MULTIPLIER = 4.0  # + one recomputed forward under activation checkpointing


def forward_flops(config: PretrainedConfig, num_samples: int, num_classes: int = NUM_CLASSES) -> FlopsBreakdown:
    """Forward FLOPs of the detector on one clip of ``num_samples`` samples (its backbone family's formula)."""
    backbone = backbone_of(config)
    if backbone is None:
        raise ValueError(f"flops: no backbone family for model_type {config.model_type!r}")
    return backbone.forward_flops(config, num_samples, num_classes)


def frame_count(config: PretrainedConfig, num_samples: int) -> int:
    return conv_output_lengths(config, num_samples)[-1]


def forward_flops_per_audio_second(config: PretrainedConfig, clip_seconds: float = DEFAULT_CLIP_SECONDS,
                                   sample_rate_hz: int = SAMPLE_RATE_HZ) -> float:
    num_samples = round(clip_seconds * sample_rate_hz)
    return forward_flops(config, num_samples).total / clip_seconds


def training_flops_per_audio_second(config: PretrainedConfig, clip_seconds: float = DEFAULT_CLIP_SECONDS,
                                    sample_rate_hz: int = SAMPLE_RATE_HZ, recompute: bool = False) -> float:
    """Model FLOPs (``recompute=False``, the MFU convention) or hardware FLOPs including the
    recomputed forward of activation checkpointing (``recompute=True``) per audio-second trained."""
    multiplier = RECOMPUTE_MULTIPLIER if recompute else TRAIN_MULTIPLIER
    return multiplier * forward_flops_per_audio_second(config, clip_seconds, sample_rate_hz)
