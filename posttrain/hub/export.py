"""posttrain ``Detector`` <-> stock transformers ``{Wav2Vec2,Hubert}ForSequenceClassification``.

The transformers classifier computes ``classifier(masked_mean(projector(hidden)))``. A linear map
commutes with a (masked) mean, so ``projector = Detector.head`` (``classifier_proj_size = 2``) and
``classifier = identity`` give exactly posttrain's ``head(masked_mean(hidden))``: the frame mask
comes from the same ``_get_feature_vector_attention_mask`` in both, and without an attention mask
both average every frame. The published folder is self-describing and loads with
``AutoModelForAudioClassification`` / ``pipeline("audio-classification")``:

``config.json``, ``model.safetensors``, ``preprocessor_config.json`` (per-utterance normalisation,
as in training), ``README.md`` (model card) and ``posttrain.json`` (identity: preset, SSL config,
calibration, licence, provenance). A folder is written beside its destination and renamed into place,
so a half-written export never replaces a good one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, Wav2Vec2FeatureExtractor

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data.batch import ANTIDEEPFAKE_INPUT_EPS, TRANSFORMERS_INPUT_EPS
from posttrain.data.labels import FAKE_LABEL, LABEL_IDS, REAL_LABEL
from posttrain.models.detector import Detector, encoder_key
from posttrain.models.heads import LINEAR, NUM_CLASSES
from posttrain.models.score_definitions import LOGIT_DIFF
from posttrain.models.partitioned import TensorReaders
from posttrain.models.tensor_files import folder_readers
from posttrain.models.backbones import BACKBONES, backbone_of, get_backbone
from posttrain.models.presets import PRESETS
from posttrain.hub.folders import ExportError, write_export_folder

ID2LABEL = {FAKE_LABEL: "fake", REAL_LABEL: "real"}
IDENTITY_NAME = "posttrain.json"
IDENTITY_FORMAT, IDENTITY_VERSION = "posttrain-model", 1
CLASSIFIER_KEYS = ("projector.", "classifier.")  # the head of an audio classifier: classifier o projector
# Inference-time encoder settings: no LayerDrop, no SpecAugment (so no mask embedding either).
INFERENCE_SETTINGS = {"layerdrop": 0.0, "apply_spec_augment": False, "mask_time_prob": 0.0,
                      "mask_feature_prob": 0.0}
# Encoder-config fields a preset is recognised by (heads and strides leave no trace in the weights,
# so a preset supplies them).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "conv_dim", "conv_kernel",
                "conv_bias", "feat_extract_norm", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups")


# transformers' Wav2Vec2FeatureExtractor normalises with this eps, hard-coded (no config field)
STOCK_EXTRACTOR_EPS = TRANSFORMERS_INPUT_EPS
GAP_LEVELS_DBFS = (-60.0, -50.0, -40.0, -30.0, -20.0, -10.0, 0.0)  # probe peak levels for the gap
PROBE_SECONDS = 1.0




def architecture_of(config: PretrainedConfig) -> str:
    """The backbone family of an encoder config (``posttrain.models.backbones``)."""
    backbone = backbone_of(config)
    if backbone is None:
        raise ExportError(f"model_type {config.model_type!r}: only {sorted(BACKBONES)} encoders are supported")
    return backbone.name


def matching_presets(architecture: str, shape: Mapping[str, Any]) -> list[str]:
    """Presets of ``architecture`` whose encoder agrees with every field given in ``shape``."""
    matches = []
    for name, preset in PRESETS.items():
        if preset.architecture != architecture:
            continue
        config = preset.ssl_config()
        if all(_same(getattr(config, key), value) for key, value in shape.items()):
            matches.append(name)
    return matches


def _same(left: Any, right: Any) -> bool:
    return list(left) == list(right) if isinstance(left, (list, tuple)) else left == right


def config_shape(config: PretrainedConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in SHAPE_FIELDS}


def feature_extractor() -> Wav2Vec2FeatureExtractor:
    """The training input pipeline as a transformers feature extractor: 16 kHz mono, per-utterance
    zero mean / unit variance, zero padding with a mask. The closest stock route for every model: its
    eps is fixed at 1e-7 (posttrain's own models: exact); for a model trained with another eps
    (AntiDeepfake's) ``stock_pipeline_gap`` measures the difference and the card states it. The mask
    is returned for group-norm encoders too (transformers' own wav2vec2-base extractors omit it):
    posttrain trains and scores them with it."""
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE_HZ, padding_value=0.0,
                                    do_normalize=True, return_attention_mask=True)


def probe_waveform(seconds: float = PROBE_SECONDS) -> np.ndarray:
    """A fixed speech-like probe at peak 1.0 (float64): harmonics of a gliding 150 Hz fundamental
    under a 3 Hz syllable envelope, plus 5 % noise (seed 0)."""
    t = np.arange(round(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    phase = 2 * np.pi * np.cumsum(150.0 * (1.0 + 0.2 * np.sin(2 * np.pi * 2.0 * t))) / SAMPLE_RATE_HZ
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.55 - 0.45 * np.cos(2 * np.pi * 3.0 * t))
    wave = voiced + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return wave / np.abs(wave).max()


@torch.no_grad()
def stock_pipeline_gap(detector: Detector) -> dict[str, Any]:
    """How far the stock transformers route (``Wav2Vec2FeatureExtractor``, eps 1e-7, then the exported
    classifier) lands from the model's own scoring (``Detector.normalise``), as the largest |logit
    difference| on ``probe_waveform`` at each peak level of ``GAP_LEVELS_DBFS``.

    The stock extractor has no eps setting, so a model trained with another eps (AntiDeepfake's
    1e-5) cannot be matched exactly through it: on quiet input ``sqrt(var + eps)`` differs. The gap
    is measured on the exported model itself and stated on its card."""
    classifier, extractor = to_transformers(detector), feature_extractor()
    rows = _label_rows(classifier.config.id2label)  # the stock logits in [fake, real] order
    probe, gaps = probe_waveform(), []
    for level in GAP_LEVELS_DBFS:
        wave = (probe * 10.0 ** (level / 20.0)).astype(np.float32)
        lengths = torch.tensor([wave.size])
        own = detector(detector.normalise(torch.from_numpy(wave)[None], lengths), lengths)
        stock = classifier(**extractor(wave, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt")).logits
        gaps.append(float((own - stock[:, rows]).abs().max()))
    return {"levels_dbfs": list(GAP_LEVELS_DBFS), "max_abs_logit_diff": gaps, "model_eps": detector.input_eps,
            "stock_extractor_eps": STOCK_EXTRACTOR_EPS,
            "probe": f"{PROBE_SECONDS:g} s synthetic voiced-speech probe (posttrain.hub.export.probe_waveform)"}


def with_stock_pipeline_gap(detector: Detector, identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` plus the measured ``stock_pipeline_gap`` when the model's normalisation is not the
    stock extractor's (an AntiDeepfake release and its offspring): what its card must state."""
    if detector.input_eps == STOCK_EXTRACTOR_EPS:
        return dict(identity)
    return {**identity, "stock_pipeline_gap": stock_pipeline_gap(detector)}


def check_exportable(detector: Detector) -> None:
    """Only a linear head has a stock transformers classifier: a one-class (OC-softmax) head outputs a cosine
    to a renormalised weight, which ``projector``/``classifier`` cannot compute. One line naming what to do."""
    kind = detector.head_settings["head"]
    if kind != LINEAR:
        raise ExportError(f"model.head={kind}: no stock transformers classifier computes this head's cosine score, "
                          f"so it has no transformers export; share the posttrain checkpoint folder (or the "
                          f"AntiDeepfake release) instead: eval, score, serve and finetune accept it as --model")


def to_transformers(detector: Detector) -> PreTrainedModel:
    """A ``*ForSequenceClassification`` whose logits equal ``detector``'s. Its parameters are the
    detector's own tensors (no copy: a 2B model fits once in memory), so don't train both. Linear heads only
    (``check_exportable``)."""
    check_exportable(detector)
    architecture = architecture_of(detector.ssl_config)
    classifier_cls = get_backbone(architecture).classifier_class
    config = classifier_cls.config_class.from_dict({
        **detector.ssl_config.to_dict(), **INFERENCE_SETTINGS,
        "id2label": dict(ID2LABEL), "label2id": {label: index for index, label in ID2LABEL.items()},
        "classifier_proj_size": NUM_CLASSES, "use_weighted_layer_sum": False,
        "architectures": [classifier_cls.__name__]})
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = classifier_cls(config)
    prefix = model.base_model_prefix
    state = {f"{prefix}.{key}": value for key, value in detector.encoder.state_dict().items()
             if key != "masked_spec_embed"}  # SpecAugment's mask vector: training only
    head = detector.head
    state.update({"projector.weight": head.weight.detach(), "projector.bias": head.bias.detach(),
                  "classifier.weight": torch.eye(NUM_CLASSES, dtype=head.weight.dtype),
                  "classifier.bias": torch.zeros(NUM_CLASSES, dtype=head.weight.dtype)})
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def from_transformers(model: PreTrainedModel) -> Detector:
    """The detector computing ``model``'s logits in [fake, real] order: ``head = classifier o projector``
    (any two-label audio classifier whose labels are named fake/real, without a weighted layer sum)."""
    config = model.config
    check_classifier_config(config)
    encoder = getattr(model, model.base_model_prefix)
    detector = Detector(encoder)
    with torch.no_grad():
        weight, bias = head_of(config, {key: tensor for key, tensor in model.state_dict().items()
                                        if key.startswith(CLASSIFIER_KEYS)})
        detector.head.weight.copy_(weight)
        detector.head.bias.copy_(bias)
    return detector.eval()


def check_classifier_config(config: PretrainedConfig) -> None:
    """An audio classifier a detector can compute: last-layer pooling, two labels named fake and real."""
    if getattr(config, "use_weighted_layer_sum", False):
        raise ExportError("config.json: use_weighted_layer_sum: posttrain pools the last layer only")
    _label_rows(config.id2label)


def head_of(config: PretrainedConfig, classifier: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The detector head (weight, bias) computing ``classifier o projector`` of an audio classifier (its
    ``projector.*`` and ``classifier.*`` tensors), rows in [fake, real] order."""
    order = _label_rows(config.id2label)
    weight = classifier["classifier.weight"] @ classifier["projector.weight"]
    bias = classifier["classifier.weight"] @ classifier["projector.bias"] + classifier["classifier.bias"]
    return weight[order], bias[order]


def _label_rows(id2label: Mapping[int, str]) -> list[int]:
    """Row of the classifier for each posttrain class id ([fake, real])."""
    by_name = {str(name).lower(): int(index) for index, name in id2label.items()}
    if len(id2label) != NUM_CLASSES or set(by_name) != set(LABEL_IDS):
        raise ExportError(f"config.json: id2label: expected the two labels {sorted(LABEL_IDS)}, "
                          f"got {dict(id2label)}")
    return [by_name[ID2LABEL[class_id]] for class_id in range(NUM_CLASSES)]


def input_normalisation(detector: Detector) -> dict[str, Any]:
    """The identity's record of how inputs are normalised (the eps lives in ``ssl_config``)."""
    origin = "AntiDeepfake's F.layer_norm" if detector.input_eps == ANTIDEEPFAKE_INPUT_EPS else \
        "transformers' Wav2Vec2FeatureExtractor" if detector.input_eps == STOCK_EXTRACTOR_EPS else "custom"
    return {"formula": "(x - mean) / sqrt(var + eps) per utterance, over valid samples",
            "eps": detector.input_eps, "as_in": origin}


def identity_document(detector: Detector, *, preset: str | None, calibration: Mapping[str, Any] | None = None,
                      license_id: str | None = None, base_model: str | None = None,
                      source: Mapping[str, Any] | None = None,
                      training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``posttrain.json``: what the model is, where it came from and how to read its scores."""
    return {"format": IDENTITY_FORMAT, "version": IDENTITY_VERSION, "preset": preset,
            "architecture": architecture_of(detector.ssl_config),
            "ssl_config": detector.ssl_config.to_dict(),
            "input_normalisation": input_normalisation(detector),
            "labels": [ID2LABEL[i] for i in range(NUM_CLASSES)], "head": detector.head_settings,
            "score_definition": detector.score_definition.name,
            "sample_rate_hz": SAMPLE_RATE_HZ, "calibration": dict(calibration) if calibration else None,
            "license": license_id, "base_model": base_model, "source": dict(source or {}),
            "training": dict(training) if training else None}


def export_detector(detector: Detector, out_dir: str | Path, identity: Mapping[str, Any],
                    card_text: str, *, kind: str = "export", overwrite: bool = False) -> Path:
    """Write the transformers export of ``detector`` into ``out_dir`` (replaced whole, atomically; the
    folder rules of ``posttrain.hub.folders``)."""

    def write(staging: Path) -> None:
        to_transformers(detector).save_pretrained(staging, safe_serialization=True)
        feature_extractor().save_pretrained(staging)
        (staging / IDENTITY_NAME).write_text(json.dumps(identity, indent=2, default=str) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(card_text, encoding="utf-8")

    return write_export_folder(out_dir, kind, write, overwrite=overwrite)


def is_export_dir(path: str | Path) -> bool:
    """A folder holding a transformers audio-classification config (``config.json`` with a
    ``model_type``); AntiDeepfake's hub-mixin folders also have a config.json, without one."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        return "model_type" in json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportError(f"{config_path}: not JSON: {error}") from None


def read_identity(path: str | Path) -> dict[str, Any] | None:
    identity_path = Path(path) / IDENTITY_NAME
    if not identity_path.is_file():
        return None
    try:
        identity = json.loads(identity_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportError(f"{identity_path}: not JSON: {error}") from None
    if identity.get("format") != IDENTITY_FORMAT:
        raise ExportError(f"{identity_path}: format: expected {IDENTITY_FORMAT!r}, got {identity.get('format')!r}")
    return identity


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """A transformers export folder (posttrain's or any compatible one) -> ``(Detector, identity)``."""
    path = Path(path)
    _check_preprocessor(path)
    config = AutoConfig.from_pretrained(path)
    classifier_cls = get_backbone(architecture_of(config)).classifier_class
    model = classifier_cls.from_pretrained(path, **INFERENCE_SETTINGS)
    detector = from_transformers(model).to(device)
    return detector, _export_identity(path, detector)


def open_export(path: str | Path) -> tuple[Detector, dict[str, Any], Callable[[], TensorReaders]]:
    """``load_export`` without reading the weights: ``(shell, identity, open_readers)``, the shell a
    meta-device detector (its config and identity), ``open_readers()`` a reader of each Detector tensor
    (for ``posttrain.models.partitioned.load_into_partitions``): the encoder's tensors as stored, the
    head computed as ``from_transformers`` computes it."""
    path = Path(path)
    _check_preprocessor(path)
    config = AutoConfig.from_pretrained(path, **INFERENCE_SETTINGS)
    check_classifier_config(config)
    backbone = get_backbone(architecture_of(config))
    with torch.device("meta"):
        shell = Detector(backbone.encoder_class(config))
    return shell, _export_identity(path, shell), lambda: _export_readers(path, config, backbone.classifier_class)


def _export_readers(path: Path, config: PretrainedConfig, classifier_cls: type[PreTrainedModel]) -> TensorReaders:
    files = folder_readers(path)
    prefix = classifier_cls.base_model_prefix
    readers = {f"encoder.{encoder_key(key, prefix)}": read for key, read in files.items()
               if key.startswith(f"{prefix}.") and not key.endswith("masked_spec_embed")}

    def head(index: int) -> torch.Tensor:
        return head_of(config, {key: read() for key, read in files.items() if key.startswith(CLASSIFIER_KEYS)})[index]

    return {**readers, "head.weight": lambda: head(0), "head.bias": lambda: head(1)}


def _export_identity(path: Path, detector: Detector) -> dict[str, Any]:
    """The folder's ``posttrain.json``, or for someone else's model one described from its config."""
    identity = read_identity(path)
    if identity is None:
        config = detector.ssl_config
        matches = matching_presets(architecture_of(config), config_shape(config))
        identity = {"format": IDENTITY_FORMAT, "version": IDENTITY_VERSION,
                    "preset": matches[0] if matches else None, "architecture": architecture_of(config),
                    "ssl_config": detector.ssl_config.to_dict(), "calibration": None,
                    "head": detector.head_settings, "score_definition": LOGIT_DIFF.name}
    return identity


def _check_preprocessor(path: Path) -> None:
    """posttrain feeds normalised 16 kHz audio: a model expecting anything else would score differently."""
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.is_file():
        return
    settings = json.loads(preprocessor.read_text(encoding="utf-8"))
    if settings.get("sampling_rate", SAMPLE_RATE_HZ) != SAMPLE_RATE_HZ:
        raise ExportError(f"{preprocessor}: sampling_rate: expected {SAMPLE_RATE_HZ}, got {settings['sampling_rate']}")
    if settings.get("do_normalize") is False:
        raise ExportError(f"{preprocessor}: do_normalize: false, but posttrain normalises every utterance")
