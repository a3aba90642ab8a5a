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

from dataclasses import dataclass, fields

from transformers import PretrainedConfig

from posttrain.config import SAMPLE_RATE_HZ

DEFAULT_CLIP_SECONDS = 4.0
NUM_CLASSES = 2
TRAIN_MULTIPLIER = 3.0  # forward + backward (grads w.r.t. activations and weights: 2 x forward)
RECOMPUTE_MULTIPLIER = 4.0  # + one recomputed forward under activation checkpointing


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one clip, by component."""

    feature_extractor: float  # strided conv stack on the waveform
    feature_projection: float  # conv channels -> hidden size
    positional_conv: float  # grouped conv positional embedding
    attention_projections: float  # q, k, v, out
    attention_scores: float  # Q K^T and softmax(.) V: quadratic in frames
    feed_forward: float
    head: float  # pooled vector -> logits

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def scaled(self, factor: float) -> "FlopsBreakdown":
        return FlopsBreakdown(**{f.name: getattr(self, f.name) * factor for f in fields(self)})


def conv_output_lengths(config: PretrainedConfig, num_samples: int) -> list[int]:
    """Output length of each feature-extractor conv layer (no padding) for ``num_samples`` input."""
    lengths, length = [], num_samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        if length < 1:
            raise ValueError(f"{num_samples} samples are too short for the feature extractor "
                             f"(kernels {list(config.conv_kernel)}, strides {list(config.conv_stride)})")
        lengths.append(length)
    return lengths


def frame_count(config: PretrainedConfig, num_samples: int) -> int:
    return conv_output_lengths(config, num_samples)[-1]


def forward_flops(config: PretrainedConfig, num_samples: int, num_classes: int = NUM_CLASSES) -> FlopsBreakdown:
    """Forward FLOPs of the detector on one clip of ``num_samples`` samples."""
    lengths = conv_output_lengths(config, num_samples)
    channels_in = [1, *config.conv_dim[:-1]]
    extractor = sum(2.0 * length * c_out * c_in * kernel for length, c_out, c_in, kernel
                    in zip(lengths, config.conv_dim, channels_in, config.conv_kernel))
    frames, hidden, ffn, layers = lengths[-1], config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kernel = config.num_conv_pos_embeddings
    # "same" padding of kernel // 2 each side: an even kernel yields one extra frame, dropped afterwards
    pos_frames = frames + 1 - kernel % 2
    return FlopsBreakdown(
        feature_extractor=extractor,
        feature_projection=2.0 * frames * config.conv_dim[-1] * hidden,
        positional_conv=2.0 * pos_frames * hidden * (hidden // config.num_conv_pos_embedding_groups) * kernel,
        attention_projections=layers * 4 * 2.0 * frames * hidden * hidden,
        attention_scores=layers * 2 * 2.0 * frames * frames * hidden,
        feed_forward=layers * 2 * 2.0 * frames * hidden * ffn,
        head=2.0 * hidden * num_classes,
    )


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
