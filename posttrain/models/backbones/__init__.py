"""The backbone registry: one entry per SSL encoder family (wav2vec 2.0, HuBERT, WavLM), one module each.

A family declares everything posttrain knows about an encoder architecture, in one place: its
transformers config, encoder and sequence-classifier classes (training, export, reload), the attention
kernels it supports (``model.attn_implementation: auto`` takes the first), its analytic FLOPs formula
(throughput and MFU figures), and its fairseq checkpoints: the keys only they hold, whether it is the
family of a checkpoint holding no family's keys, and whether posttrain converts them (AntiDeepfake
releases). Presets (``posttrain.models.presets``) name a family by ``Backbone.name``; tests read their
matrices (families, presets, FLOPs, export, conversion) from here.

Adding a family: a module here defining a ``Backbone`` and calling ``register_backbone`` (every module
of this package registers on import, found by itself), and its presets.
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
    # self-attention kernels transformers implements for this encoder; the first is what "auto" picks
    attention_kernels: tuple[str, ...] = ("sdpa", "flash_attention_2", "eager")
    # fairseq encoder keys (relative to the encoder) only this family's checkpoints hold
    fairseq_markers: tuple[str, ...] = ()
    # the family of a fairseq checkpoint that holds no family's markers (exactly one family says so)
    fairseq_default: bool = False
    # posttrain converts this family's fairseq checkpoints (posttrain.hub.antideepfake); False: refused
    fairseq_convertible: bool = True

    def attention(self, requested: str) -> str:
        """The kernel for ``model.attn_implementation`` (``auto``: this family's first)."""
        if requested == "auto":
            return self.attention_kernels[0]
        if requested not in self.attention_kernels:
            raise ValueError(f"model.attn_implementation: {requested!r} is not supported by the {self.name} family "
                             f"(its kernels: {', '.join(self.attention_kernels)}); use auto")
        return requested


BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    if backbone.name in BACKBONES and BACKBONES[backbone.name] != backbone:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    others = [b.name for b in BACKBONES.values() if b.fairseq_default and b.name != backbone.name]
    if backbone.fairseq_default and others:
        raise ValueError(f"backbone {backbone.name!r}: {others[0]!r} is already the fairseq default family")
    if not backbone.fairseq_default and not backbone.fairseq_markers:
        raise ValueError(f"backbone {backbone.name!r}: declare its fairseq_markers (or make it the default family)")
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
    """The family of a fairseq encoder state from its key names (relative to the encoder): the one whose
    markers it holds, else the declared default family (whatever the order families registered in)."""
    keys = list(keys)
    for backbone in BACKBONES.values():
        if backbone.fairseq_markers and any(key.startswith(backbone.fairseq_markers) for key in keys):
            return backbone
    (default,) = [backbone for backbone in BACKBONES.values() if backbone.fairseq_default]
    return default


def _discover() -> None:
    """Import every family module of this package: each registers itself."""
    import importlib
    import pkgutil

    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        importlib.import_module(f"{__name__}.{module_info.name}")


_discover()
