"""WavLM (Chen et al., 2022): the wav2vec 2.0 encoder with gated relative position bias in its self-attention.
transformers implements its attention in eager mode only. Its original checkpoints (microsoft/unilm) hold
the gate (``grep_linear``) and the bucketed bias; posttrain reads WavLM from transformers checkpoints
(hub ids, exports) and does not convert the unilm layout (no AntiDeepfake release uses WavLM)."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig, WavLMConfig, WavLMForSequenceClassification, WavLMModel

from posttrain.models.backbones import Backbone, FlopsBreakdown, register_backbone
from posttrain.models.backbones.wav2vec2 import conv_output_lengths, transformer_flops

GATE_UNITS = 8  # gru_rel_pos_linear: head_dim -> 8 gate units per head and frame


def wavlm_flops(config: PretrainedConfig, num_samples: int, num_classes: int) -> FlopsBreakdown:
    """wav2vec 2.0's count plus the relative-position gate of every layer (a head_dim -> 8 projection per
    head and frame); the bias table lookup and its addition to the scores are not matrix products."""
    base = transformer_flops(config, num_samples, num_classes)
    frames = conv_output_lengths(config, num_samples)[-1]
    gate = config.num_hidden_layers * 2.0 * frames * config.hidden_size * GATE_UNITS
    return dataclasses.replace(base, attention_projections=base.attention_projections + gate)


WAVLM = register_backbone(Backbone("wavlm", WavLMConfig, WavLMModel, WavLMForSequenceClassification, wavlm_flops,
                                   attention_kernels=("eager",),
                                   fairseq_markers=("encoder.layers.0.self_attn.grep_linear",
                                                    "encoder.layers.0.self_attn.relative_attention_bias"),
                                   fairseq_convertible=False))
