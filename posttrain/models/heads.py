"""The classifier heads of a detector (``model.head``): what each one is built from, its training loss and what
its outputs mean as a score. The one home of these three facts; the detector, the train step, sharpness,
eval, score, serve and the timelines ask here.

Every head maps the pooled embedding ``[B, D]`` to ``[B, 2]`` in [fake, real] column order, so whatever
reads columns keeps working:

- ``linear``: ``nn.Linear(D, 2)``, two logits (AntiDeepfake's ``proj_fc``). Loss: cross-entropy. Score
  ``logit_diff`` = real logit - fake logit; its sigmoid is the softmax P(real). Uncalibrated decision: bona
  fide when ``logit_diff >= 0`` (a tie of the two logits is bona fide).
- ``oc_softmax``: ``posttrain.models.oc_softmax.OCSoftmaxHead`` (AntiDeepfake's ``OCAngleLayer``), outputs
  ``[-cos, cos]`` (AD's ``flag_angle_only``). Loss: OC-softmax with the configured margins and scale. Score
  ``cosine`` = column 1 (what AD's evaluation reads), not real minus fake (that would be 2 cos). A cosine is
  not a logit: P(real) only comes from a fitted calibration. Uncalibrated decision: bona fide when the
  cosine is >= the midpoint of the two margins, where the two classes' training losses are equal (as the
  tie of two logits is for cross-entropy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import ModelConfig, from_dict
from posttrain.models.oc_softmax import OCSoftmaxHead
from posttrain.models.score_definitions import LOGIT_DIFF, ScoreDefinition, cosine_definition

NUM_CLASSES = 2  # [fake, real]
LINEAR, OC_SOFTMAX = "linear", "oc_softmax"
# the ModelConfig fields a head of each kind is built from: its settings, recorded in a model's identity
HEAD_FIELDS = {LINEAR: ("head",), OC_SOFTMAX: ("head", "oc_margin_real", "oc_margin_fake", "oc_scale")}


def build_head(settings: Mapping[str, Any] | None, in_features: int) -> nn.Module:
    """The head ``settings`` (``head_settings``' dict; None = linear) describe, on ``in_features`` inputs."""
    cfg = from_dict(ModelConfig, dict(settings or {}), "model")
    if cfg.head == OC_SOFTMAX:
        return OCSoftmaxHead(in_features, w_posi=cfg.oc_margin_real, w_nega=cfg.oc_margin_fake, alpha=cfg.oc_scale)
    if cfg.head == LINEAR:
        return nn.Linear(in_features, NUM_CLASSES)
    raise ValueError(f"model.head: {cfg.head!r} is not one of {sorted(HEAD_FIELDS)}")


def config_settings(cfg: ModelConfig) -> dict[str, Any]:
    """The head settings of a model config: the ``HEAD_FIELDS`` of its head kind."""
    if cfg.head not in HEAD_FIELDS:
        raise ValueError(f"model.head: {cfg.head!r} is not one of {sorted(HEAD_FIELDS)}")
    return {key: getattr(cfg, key) for key in HEAD_FIELDS[cfg.head]}


def head_settings(head: nn.Module) -> dict[str, Any]:
    """What a built head is, as ``ModelConfig`` fields (``build_head`` rebuilds it; identities record it)."""
    if isinstance(head, OCSoftmaxHead):
        return {"head": OC_SOFTMAX, "oc_margin_real": head.w_posi, "oc_margin_fake": head.w_nega,
                "oc_scale": head.alpha}
    return {"head": LINEAR}


def sample_losses(model: nn.Module, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample training loss ``[B]`` (float32) of ``model``'s ``[B, 2]`` outputs, labels 1 = bona fide,
    0 = spoof: its ``head``'s (a model without one, e.g. a test's stand-in, trains with cross-entropy)."""
    head = getattr(model, "head", None)
    outputs = outputs.float()
    if isinstance(head, OCSoftmaxHead):
        return head.sample_losses(outputs, labels)
    return F.cross_entropy(outputs, labels, reduction="none")


def score_definition(head: nn.Module) -> ScoreDefinition:
    """What ``head``'s outputs mean as a score (the module doc)."""
    if isinstance(head, OCSoftmaxHead):
        return cosine_definition(head.w_posi, head.w_nega)
    return LOGIT_DIFF
