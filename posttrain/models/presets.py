"""Backbone dimensions of every AntiDeepfake SSL encoder, as transformers configs.

Each preset names the transformers architecture, the encoder shape, the feature-extractor kind
(group norm without conv bias for wav2vec 2.0 small; layer norm, conv bias and pre-LN transformer for
the large/MMS/XLS-R family; HuBERT XL has no conv bias), the parameter count of the released model
(for checks) and the hub id of its pre-trained SSL weights. ``tiny*`` presets are for tests (``tiny_presets``).
WavLM (not an AntiDeepfake backbone) is here for its own sake: base-plus and large shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from posttrain.models.backbones import get_backbone


# The released feature extractors all use 7 conv layers of 512 channels (total stride 320 = 20 ms).
_FULL_CONV = {"conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2]}
_GROUP_NORM = {"feat_extract_norm": "group", "conv_bias": False, "do_stable_layer_norm": False}
_LAYER_NORM = {"feat_extract_norm": "layer", "conv_bias": True, "do_stable_layer_norm": True}
# fairseq HuBERT has no conv bias (AntiDeepfake's HBT_configs too), but the hub config of
# facebook/hubert-xlarge-ll60k says conv_bias: true: loading it as is adds conv biases the released
# detector does not have. Forced onto the pre-trained config of the HuBERT presets.
_FAIRSEQ_HUBERT = {"conv_bias": False}
# Training regularisation (keys of posttrain.config.ModelConfig): none by default, and AntiDeepfake's
# fairseq values where its W2V_configs.py sets them. Its wav2vec 2.0 small config leaves dropout and
# attention_dropout at fairseq's default 0.1 and sets dropout_input 0.1, encoder_layerdrop 0.05 and
# feature_grad_mult 0.1; MMS-1B and XLS-R-1B/2B set dropout_input 0.1 (their dropout_features only
# feeds the pre-training quantiser). HuBERT XL (HBT_configs.py) and the rest set everything to 0.
NO_REGULARISATION = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "input_dropout": 0.0,
                     "layerdrop": 0.0, "feature_grad_mult": 1.0}
_AD_W2V_SMALL = {**NO_REGULARISATION, "hidden_dropout": 0.1, "attention_dropout": 0.1, "input_dropout": 0.1,
                 "layerdrop": 0.05, "feature_grad_mult": 0.1}
_AD_INPUT_DROPOUT = {**NO_REGULARISATION, "input_dropout": 0.1}
_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "conv_dim": [32, 32, 32], "conv_kernel": [10, 3, 3], "conv_stride": [5, 2, 2],
         "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}


_TINY_WAVLM = {"num_buckets": 32, "max_bucket_distance": 64}  # relative position buckets sized for tiny clips


def _shape(layers: int, dim: int, ffn: int, heads: int) -> dict[str, int]:
    return {"num_hidden_layers": layers, "hidden_size": dim, "intermediate_size": ffn, "num_attention_heads": heads}


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str  # its backbone family (``posttrain.models.backbones``)
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    params_millions: float | None = None  # released model size, for checks; None for test presets
    hub_id: str | None = None  # pre-trained SSL weights
    antideepfake_repo: str | None = None  # released post-trained detector (without the -nda suffix)
    pretrained_overrides: dict[str, Any] = field(default_factory=dict)  # fixes to the hub_id config
    regularisation: dict[str, float] = field(default_factory=lambda: dict(NO_REGULARISATION))  # training defaults

    def ssl_config(self, **overrides: Any) -> PretrainedConfig:
        return get_backbone(self.architecture).config_class(**{**self.config_kwargs, **overrides})


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in [
        Preset("tiny", "wav2vec2", {**_TINY, **_LAYER_NORM}),
        Preset("tiny_group_norm", "wav2vec2", {**_TINY, **_GROUP_NORM}),
        Preset("tiny_hubert", "hubert", {**_TINY, **_LAYER_NORM, **_FAIRSEQ_HUBERT},
               pretrained_overrides=_FAIRSEQ_HUBERT),
        Preset("wav2vec2_small", "wav2vec2", {**_FULL_CONV, **_GROUP_NORM, **_shape(12, 768, 3072, 12)},
               95, "facebook/wav2vec2-base", "nii-yamagishilab/wav2vec-small-anti-deepfake",
               regularisation=_AD_W2V_SMALL),
        Preset("wav2vec2_large", "wav2vec2", {**_FULL_CONV, **_LAYER_NORM, **_shape(24, 1024, 4096, 16)},
               317, "facebook/wav2vec2-large-robust", "nii-yamagishilab/wav2vec-large-anti-deepfake"),
        Preset("mms_300m", "wav2vec2", {**_FULL_CONV, **_LAYER_NORM, **_shape(24, 1024, 4096, 16)},
               317, "facebook/mms-300m", "nii-yamagishilab/mms-300m-anti-deepfake"),
        Preset("xlsr_300m", "wav2vec2", {**_FULL_CONV, **_LAYER_NORM, **_shape(24, 1024, 4096, 16)},
               317, "facebook/wav2vec2-xls-r-300m", None),
        Preset("mms_1b", "wav2vec2", {**_FULL_CONV, **_LAYER_NORM, **_shape(48, 1280, 5120, 16)},
               965, "facebook/mms-1b", "nii-yamagishilab/mms-1b-anti-deepfake", regularisation=_AD_INPUT_DROPOUT),
        Preset("xlsr_1b", "wav2vec2", {**_FULL_CONV, **_LAYER_NORM, **_shape(48, 1280, 5120, 16)},
               965, "facebook/wav2vec2-xls-r-1b", "nii-yamagishilab/xls-r-1b-anti-deepfake",
               regularisation=_AD_INPUT_DROPOUT),
        Preset("xlsr_2b", "wav2vec2", {**_FULL_CONV, **_LAYER_NORM, **_shape(48, 1920, 7680, 16)},
               2200, "facebook/wav2vec2-xls-r-2b", "nii-yamagishilab/xls-r-2b-anti-deepfake",
               regularisation=_AD_INPUT_DROPOUT),
        Preset("tiny_wavlm", "wavlm", {**_TINY, **_GROUP_NORM, **_TINY_WAVLM}),
        Preset("tiny_wavlm_layer_norm", "wavlm", {**_TINY, **_LAYER_NORM, "conv_bias": False, **_TINY_WAVLM}),
        Preset("wavlm_base_plus", "wavlm", {**_FULL_CONV, **_GROUP_NORM, **_shape(12, 768, 3072, 12)},
               95, "microsoft/wavlm-base-plus", None),
        Preset("wavlm_large", "wavlm", {**_FULL_CONV, **_LAYER_NORM, "conv_bias": False, **_shape(24, 1024, 4096, 16)},
               317, "microsoft/wavlm-large", None),
        Preset("hubert_xl", "hubert", {**_FULL_CONV, **_LAYER_NORM, **_FAIRSEQ_HUBERT, **_shape(48, 1280, 5120, 16)},
               964, "facebook/hubert-xlarge-ll60k", "nii-yamagishilab/hubert-xlarge-anti-deepfake",
               pretrained_overrides=_FAIRSEQ_HUBERT),
    ]
}


def tiny_presets() -> list[str]:
    """The small random presets tests build (no released size): at least one per backbone family."""
    return [name for name, preset in PRESETS.items() if preset.params_millions is None]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r} (known: {sorted(PRESETS)})")
    return PRESETS[name]
