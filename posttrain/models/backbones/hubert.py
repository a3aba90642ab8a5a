"""HuBERT: the wav2vec 2.0 encoder architecture trained on clustered targets; fairseq checkpoints hold the
``label_embs*`` of those targets, which tell them apart from wav2vec 2.0's."""

from __future__ import annotations

from transformers import HubertConfig, HubertForSequenceClassification, HubertModel

from posttrain.models.backbones import Backbone, register_backbone
from posttrain.models.backbones.wav2vec2 import transformer_flops

HUBERT = register_backbone(Backbone("hubert", HubertConfig, HubertModel, HubertForSequenceClassification,
                                    transformer_flops, fairseq_markers=("label_embs",)))
