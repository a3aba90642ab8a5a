"""The backbone registry: one entry per SSL encoder family (wav2vec 2.0, HuBERT; later WavLM), one module each.

A family is everything posttrain knows about an encoder architecture, in one place: its transformers
config, encoder and sequence-classifier classes (training, export, reload), its analytic FLOPs
formula (throughput and MFU figures) and how its fairseq checkpoints are told apart (release
conversion). Presets (``posttrain.models.presets``) name a family by ``Backbone.name``.

Adding a family: a module here defining a ``Backbone`` and calling ``register_backbone``, imported below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one clip through a detector, by component."""

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


@dataclass(frozen=True)
class Backbone:
    name: str  # what presets and identity documents call the family ("architecture")
    config_class: type[PretrainedConfig]
    encoder_class: type[PreTrainedModel]
    classifier_class: type[PreTrainedModel]  # the stock *ForSequenceClassification an export becomes
    # forward FLOPs of a detector with this encoder on one clip: (encoder config, samples, classes)
    forward_flops: Callable[[PretrainedConfig, int, int], FlopsBreakdown]
    # fairseq encoder keys (relative to the encoder) only this family's checkpoints hold; a family
    # without markers is the one a checkpoint without any family's markers belongs to
    fairseq_markers: tuple[str, ...] = ()


BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    if backbone.name in BACKBONES and BACKBONES[backbone.name] != backbone:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone family {name!r} (known: {sorted(BACKBONES)})")
    return BACKBONES[name]


def backbone_of(config: PretrainedConfig) -> Backbone | None:
    """The family of an encoder config (None: not one posttrain supports)."""
    for backbone in BACKBONES.values():
        if isinstance(config, backbone.config_class):
            return backbone
    return None


def fairseq_family(keys: Iterable[str]) -> Backbone:
    """The family of a fairseq encoder state from its key names (relative to the encoder)."""
    keys = list(keys)
    for backbone in BACKBONES.values():
        if backbone.fairseq_markers and any(key.startswith(backbone.fairseq_markers) for key in keys):
            return backbone
    defaults = [backbone for backbone in BACKBONES.values() if not backbone.fairseq_markers]
    return defaults[0]


# the families (each registers itself)
from posttrain.models.backbones import hubert, wav2vec2  # noqa: E402,F401
