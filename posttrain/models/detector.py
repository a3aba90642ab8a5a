"""The detector: SSL encoder -> mean over *valid* frames -> head; outputs are ``[B, 2]`` in [fake, real] order.

The head is ``model.head`` (``posttrain.models.heads``): ``Linear(D, 2)`` logits, or AntiDeepfake's one-class
softmax giving ``[-cos, cos]``; the head also decides the training loss (``Detector.sample_losses``) and what
the outputs mean as a score (``Detector.score_definition``).

Unlike AntiDeepfake, padding never reaches the pooled vector: the frame mask comes from the true
sample lengths through the feature extractor's own output-length arithmetic, and the same mask
goes to self-attention. Group-norm extractors (wav2vec 2.0 small) take their first conv layer's
statistics over valid frames only (``posttrain.models.masked_norm``), so a padded batch scores as
batch 1 for every backbone.

``pool_over_padding`` restores AntiDeepfake's training batches (``model.pool_over_padding``): the zero
padding goes through the encoder unmasked (attention and group norm see it) and into the mean. It acts
in training mode only: validation and scoring always mask padding, so a score never depends on what it
was batched with.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from posttrain.config import ModelConfig
from posttrain.data.batch import TRANSFORMERS_INPUT_EPS, normalize_waveforms
from posttrain.errors import hf_download_hint
from posttrain.hubcache import hub_offline, pretrained_folder
from posttrain.models.backbones import get_backbone
from posttrain.models.heads import build_head, config_settings, head_settings
from posttrain.models.score_definitions import ScoreDefinition
from posttrain.models.heads import sample_losses as head_sample_losses
from posttrain.models.heads import score_definition as head_score_definition
from posttrain.models.masked_norm import first_conv_frames, install_masked_group_norm
from posttrain.models.partitioned import (cast_partitions, initialise_partitioned, load_into_partitions,
                                          partition_dtype, partitioned_build)
from posttrain.models.presets import get_preset
from posttrain.models.regularise import SyncedLayerDrop, install_feature_grad_mult
from posttrain.models.tensor_files import folder_readers

# The input normalisation eps a model was trained with, kept in its encoder config so that it travels
# with checkpoints (saved ssl_config) and exports (config.json); absent = TRANSFORMERS_INPUT_EPS.
INPUT_EPS_FIELD = "posttrain_input_norm_eps"
# weight-norm names of checkpoints saved before torch's parametrizations (what from_pretrained renames)
LEGACY_WEIGHT_NORM = {".weight_g": ".parametrizations.weight.original0",
                      ".weight_v": ".parametrizations.weight.original1"}


class Detector(nn.Module):
    def __init__(self, encoder: PreTrainedModel, *, pool_over_padding: bool = False, layerdrop_seed: int = 0,
                 head: dict[str, Any] | None = None):
        """``head``: the head's settings (``posttrain.models.heads.head_settings``; None = linear)."""
        super().__init__()
        self.encoder = encoder
        self.pool_over_padding = pool_over_padding
        self.layerdrop_sync = SyncedLayerDrop(layerdrop_seed)
        self.head = build_head(head, encoder.config.hidden_size)
        # a plain attribute (a tuple), not a submodule: its parameters are the encoder's own
        self._group_norm = (install_masked_group_norm(encoder),)

    @property
    def ssl_config(self) -> PretrainedConfig:
        return self.encoder.config

    @property
    def head_settings(self) -> dict[str, Any]:
        """The head's ``model.*`` settings (kind, margins, scale): recorded in identities, rebuilt from them."""
        return head_settings(self.head)

    @property
    def score_definition(self) -> ScoreDefinition:
        """What this model's outputs mean as a score (logit_diff, or the OC head's cosine)."""
        return head_score_definition(self.head)

    def sample_losses(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss ``[B]`` (float32) of ``forward``'s outputs: the head's (cross-entropy, or
        the OC-softmax loss with its margins and scale)."""
        return head_sample_losses(self, outputs, labels)

    @property
    def input_eps(self) -> float:
        """The eps of the per-utterance normalisation this model was trained with."""
        return float(getattr(self.ssl_config, INPUT_EPS_FIELD, TRANSFORMERS_INPUT_EPS))

    def normalise(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Raw zero-padded waveforms -> this model's inputs (its own normalisation)."""
        return normalize_waveforms(waveforms, lengths, self.input_eps)

    def frame_mask(self, lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``[B, frames] bool``: frames computed from valid samples only."""
        return self.encoder._get_feature_vector_attention_mask(num_frames, lengths_to_mask(lengths)).bool()

    def embed(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled (penultimate) representation ``[B, D]``."""
        if self.pool_over_padding and self.training:
            return self._embed_as_antideepfake(waveforms)
        sample_mask = lengths_to_mask(lengths, waveforms.shape[1])
        if self._group_norm[0] is not None:
            self._group_norm[0].valid_frames = first_conv_frames(self.encoder, lengths)
        hidden = self._encode(waveforms, sample_mask.long())
        mask = self.frame_mask(lengths, hidden.shape[1]).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def _embed_as_antideepfake(self, waveforms: torch.Tensor) -> torch.Tensor:
        """AD's pooling: no attention mask, group-norm statistics over every frame, mean over every frame."""
        if self._group_norm[0] is not None:
            self._group_norm[0].valid_frames = None
        return self._encode(waveforms, None).mean(dim=1)

    def _encode(self, waveforms: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The encoder's last hidden state; LayerDrop (training only) draws alike on every rank."""
        waveforms = waveforms.to(self.head.weight.dtype)
        if not (self.training and self.encoder.config.layerdrop > 0):
            return self.encoder(waveforms, attention_mask=attention_mask).last_hidden_state
        with self.layerdrop_sync.draws():
            return self.encoder(waveforms, attention_mask=attention_mask).last_hidden_state

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(waveforms, lengths))


def lengths_to_mask(lengths: torch.Tensor, width: int | None = None) -> torch.Tensor:
    width = int(lengths.max()) if width is None else width
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def regularisation(cfg: ModelConfig, layerdrop_conflicts: Sequence[str] = ()) -> dict[str, float]:
    """The encoder regularisation of a training run: each ``cfg`` value, or the preset's AntiDeepfake
    value where it is unset. An unset LayerDrop is 0 under ``layerdrop_conflicts`` (SAM, ZeRO-3,
    activation checkpointing: ``posttrain.config.layerdrop_conflicts``; an explicit one is refused there)."""
    values = {key: default if getattr(cfg, key) is None else getattr(cfg, key)
              for key, default in get_preset(cfg.preset).regularisation.items()}
    if cfg.layerdrop is None and layerdrop_conflicts:
        values["layerdrop"] = 0.0
    return values


def ssl_overrides(cfg: ModelConfig, values: dict[str, float]) -> dict[str, object]:
    """Training-time settings forced onto any encoder config (``values``: ``regularisation``)."""
    return {
        "layerdrop": values["layerdrop"],
        "apply_spec_augment": cfg.mask_time_prob > 0,
        "mask_time_prob": cfg.mask_time_prob,
        "mask_time_length": cfg.mask_time_length,
        "mask_feature_prob": 0.0,
        "hidden_dropout": values["hidden_dropout"],
        "activation_dropout": values["activation_dropout"],
        "attention_dropout": values["attention_dropout"],
        "feat_proj_dropout": values["input_dropout"],
        "attn_implementation": attention_implementation(cfg),
    }


def attention_implementation(cfg: ModelConfig) -> str:
    """``model.attn_implementation`` resolved for the preset's family (``auto``: its first kernel) and
    checked: the family must implement it, and flash attention needs its package (then CUDA + bf16)."""
    kernel = get_backbone(get_preset(cfg.preset).architecture).attention(cfg.attn_implementation)
    if kernel == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn, on a CUDA machine); or use auto")
    return kernel


def compile_encoder(encoder: PreTrainedModel) -> None:
    """``torch.compile`` each transformer layer in place (``model.compile``). Layer by layer, not the
    whole model: the graphs stay small and shape-generic over clip lengths (``dynamic=True``), and
    DeepSpeed's ZeRO hooks and activation checkpointing sit between layers, outside the graphs."""
    for layer in encoder.encoder.layers:
        layer.compile(dynamic=True)


def enable_activation_checkpointing(encoder: PreTrainedModel) -> None:
    """Recompute the encoder's layer activations in the backward pass (non-reentrant checkpoints).
    transformers 5 renamed ``gradient_checkpointing_enable`` (now a deprecated alias that warns) to
    ``activation_checkpointing_enable``; older releases the range allows have only the old name."""
    enable = getattr(encoder, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_detector(cfg: ModelConfig, ssl_config: PretrainedConfig | dict | None = None, *,
                   layerdrop_conflicts: Sequence[str] = (), layerdrop_seed: int = 0,
                   zero3: dict[str, Any] | None = None) -> Detector:
    """A detector for ``cfg``: random init from the preset (or from ``ssl_config``, e.g. the one saved
    with a checkpoint), or pre-trained SSL weights from ``cfg.pretrained`` (hub id or local path), with
    the training regularisation of ``regularisation(cfg, layerdrop_conflicts)``.

    ``zero3``: the DeepSpeed config of a ZeRO-3 run; the detector is then built straight into its
    partitions (``posttrain.models.partitioned``), with the weights a plain build draws for the same seed,
    and its partitions in the run's precision. With ``cfg.pretrained`` it is built as a random one and the
    SSL weights are read into it (``_load_pretrained_partitions``): those are ``from_pretrained``'s, bit for
    bit; the head is drawn after a full random initialisation, so from the same distribution but with other
    numbers than a plain ``from_pretrained`` build draws (whose RNG use depends on transformers' loading)."""
    preset = get_preset(cfg.preset)
    encoder_cls = get_backbone(preset.architecture).encoder_class
    values = regularisation(cfg, layerdrop_conflicts)
    overrides = ssl_overrides(cfg, values)
    # only the constructors run inside zero.Init: it gathers (and broadcasts) every module's parameters
    # around any Module.apply, which transformers' activation-checkpointing switch uses
    with partitioned_build(zero3) if zero3 else contextlib.nullcontext():
        if cfg.pretrained and not zero3:
            encoder = _load_pretrained(encoder_cls, cfg.pretrained, {**overrides, **preset.pretrained_overrides})
        else:
            encoder = encoder_cls(_encoder_config(cfg, encoder_cls, ssl_config, overrides))
            if zero3:
                initialise_partitioned(encoder)
                if cfg.pretrained:
                    _load_pretrained_partitions(encoder, cfg.pretrained)
        detector = Detector(encoder, pool_over_padding=cfg.pool_over_padding, layerdrop_seed=layerdrop_seed,
                            head=config_settings(cfg))
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(encoder)
    if cfg.freeze_feature_encoder:
        encoder.freeze_feature_encoder()
    install_feature_grad_mult(encoder, values["feature_grad_mult"])
    if cfg.input_norm_eps is not None:  # else the loaded/saved config's own (absent: TRANSFORMERS_INPUT_EPS)
        setattr(encoder.config, INPUT_EPS_FIELD, cfg.input_norm_eps)
    if cfg.compile:
        compile_encoder(encoder)
    if zero3:
        cast_partitions(detector, partition_dtype(zero3))
    return detector


def _encoder_config(cfg: ModelConfig, encoder_cls: type[PreTrainedModel], ssl_config: PretrainedConfig | dict | None,
                    overrides: dict) -> PretrainedConfig:
    """The encoder config of a detector built here rather than loaded: ``cfg.pretrained``'s (read without
    its weights), ``ssl_config`` (a dict: the overrides applied) or the preset's."""
    preset = get_preset(cfg.preset)
    if cfg.pretrained:
        return _pretrained_config(encoder_cls, cfg.pretrained, {**overrides, **preset.pretrained_overrides})
    if isinstance(ssl_config, dict):
        return encoder_cls.config_class(**{**ssl_config, **overrides})
    return preset.ssl_config(**overrides) if ssl_config is None else ssl_config


def _load_pretrained(encoder_cls: type[PreTrainedModel], source: str, overrides: dict) -> PreTrainedModel:
    with _pretrained_errors(source):
        return encoder_cls.from_pretrained(source, **overrides)


def _pretrained_config(encoder_cls: type[PreTrainedModel], source: str, overrides: dict) -> PretrainedConfig:
    with _pretrained_errors(source):
        config = encoder_cls.config_class.from_pretrained(source, **overrides)
    config.name_or_path = source  # as from_pretrained records it
    return config


def _load_pretrained_partitions(encoder: PreTrainedModel, source: str) -> None:
    """``from_pretrained``'s weights into a partitioned encoder, as transformers would load them (under
    ZeRO-3 its own loading fails on this family: see ``posttrain.models.partitioned``): the base-model
    prefix dropped, legacy weight-norm names renamed, keys the encoder lacks (pre-training heads) skipped,
    and parameters the checkpoint lacks left as initialised."""
    def open_readers() -> dict:
        with _pretrained_errors(source):
            readers = folder_readers(pretrained_folder(source))
        wanted = dict(encoder.named_parameters())
        renamed = {encoder_key(key, encoder.base_model_prefix): read for key, read in readers.items()}
        return {key: read for key, read in renamed.items() if key in wanted}

    load_into_partitions(encoder, open_readers, strict=False)


def encoder_key(key: str, base_prefix: str) -> str:
    """A transformers checkpoint key as the encoder names it: the model's base prefix (``wav2vec2.``) dropped
    and legacy weight-norm names renamed, as ``from_pretrained`` does."""
    key = key.removeprefix(f"{base_prefix}.")
    for legacy, current in LEGACY_WEIGHT_NORM.items():
        if key.endswith(legacy):
            return key[: -len(legacy)] + current
    return key


@contextlib.contextmanager
def _pretrained_errors(source: str) -> Iterator[None]:
    """``model.pretrained`` that cannot be read: one line with the fix (offline: how to download it)."""
    try:
        yield
    except OSError as error:
        offline = hub_offline()
        hint = (f"it is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {hf_download_hint(source)} "
                f"as model.pretrained") if offline else str(error)
        raise FileNotFoundError(f"model.pretrained: cannot load {source!r}: {hint}") from error


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
