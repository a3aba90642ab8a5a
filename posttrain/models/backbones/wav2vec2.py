"""wav2vec 2.0 (and its MMS / XLS-R checkpoints): the default family of fairseq checkpoints.

Its FLOPs formula (``transformer_flops``) counts every matrix product and convolution at 2 FLOPs per
multiply-add (the convention of ``torch.utils.flop_counter`` and of MFU papers); norms, activations,
softmax, masking, pooling and biases are left out (well under 1 % for every preset). HuBERT shares
the architecture and the formula.
"""

from __future__ import annotations

from transformers import PretrainedConfig, Wav2Vec2Config, Wav2Vec2ForSequenceClassification, Wav2Vec2Model

from posttrain.models.backbones import Backbone, FlopsBreakdown, register_backbone


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


def transformer_flops(config: PretrainedConfig, num_samples: int, num_classes: int) -> FlopsBreakdown:
    """Forward FLOPs of a detector on one clip of ``num_samples`` samples: conv feature extractor,
    projection, grouped-conv positional embedding, post/pre-LN transformer layers and the head."""
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


# its fairseq checkpoints hold no key of their own: the family of those that hold no other family's
WAV2VEC2 = register_backbone(Backbone("wav2vec2", Wav2Vec2Config, Wav2Vec2Model, Wav2Vec2ForSequenceClassification,
                                      transformer_flops, fairseq_default=True))
