"""The released AntiDeepfake checkpoints, converted from their fairseq layout without fairseq.

A release is one ``model.safetensors`` (Hugging Face) or a SpeechBrain ``.ckpt`` torch pickle
(Zenodo) holding the state dict of a wrapper around a fairseq wav2vec 2.0 / HuBERT model:
``m_ssl.model.<fairseq names>`` plus the head ``proj_fc.{weight,bias}``. AD's ``models/W2V.py`` keeps its
one-class head (``loss='ocsoftmax'``) under the same name: ``proj_fc`` is then an ``OCAngleLayer``, one
``proj_fc.weight`` of shape ``(D, 1)`` and no bias, which converts to a detector with ``model.head=oc_softmax``
(AD's default margins and scale, the ones its layer is built with; the weight layout is posttrain's own).
The encoder shape (conv stack, norm kind, width, depth, positional conv) is read off the tensors;
attention heads and conv strides leave no trace in the weights, so the preset with that shape supplies them.
Every key must be accounted for: mapped to transformers, or a known pre-training-only module; anything else is an
error naming the key, as is a required key that is missing.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ModelConfig
from posttrain.eval.report import file_sha256
from posttrain.hub.export import matching_presets
from posttrain.data.batch import ANTIDEEPFAKE_INPUT_EPS
from posttrain.models.backbones import BACKBONES, fairseq_family
from posttrain.models.detector import INPUT_EPS_FIELD, Detector, build_detector
from posttrain.models.heads import LINEAR, OC_SOFTMAX
from posttrain.models.partitioned import TensorReaders
from posttrain.models.presets import PRESETS
from posttrain.models.tensor_files import mapped_pickle, read_safetensor, safetensors_meta

ENCODER_PREFIX = "m_ssl.model."
HEAD_KEYS = {"proj_fc.weight": "head.weight", "proj_fc.bias": "head.bias"}
OC_HEAD_KEYS = {"proj_fc.weight": "head.weight"}  # AD's OCAngleLayer: weight (D, 1), no bias
LICENSE = "cc-by-nc-sa-4.0"  # the released checkpoints' licence: carried over to anything converted
NDA_SUFFIX = "-nda"  # the models post-trained without data augmentation
# fairseq modules used only by the pre-training objectives (relative to ENCODER_PREFIX); mask_emb is
# SpecAugment's mask vector, unused at inference (posttrain exports run without SpecAugment).
PRETRAINING_ONLY = re.compile(r"^(quantizer\.|input_quantizer\.|project_q\.|project_inp\.|final_proj\.|"
                              r"target_glu\.|label_embs|mask_emb$)")
TORCH_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# top-level modules of a transformers *ForSequenceClassification state dict (what an export holds)
TRANSFORMERS_PREFIXES = ("wav2vec2.", "hubert.", "classifier.", "projector.")
# fairseq builds patched for newer torch register the positional conv's weight norm as a parametrization
POS_CONV_ALIASES = {"encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
                    "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v"}


def released_checkpoints() -> dict[str, str]:
    """Hub id of every released checkpoint -> the posttrain preset of its backbone."""
    released = {}
    for name, preset in PRESETS.items():
        if preset.antideepfake_repo:
            released[preset.antideepfake_repo] = name
            released[preset.antideepfake_repo + NDA_SUFFIX] = name
    return released


class ConversionError(ValueError):
    """A checkpoint that does not convert, naming the file and key."""


@dataclass(frozen=True)
class FairseqShape:
    """What the tensors say about the encoder, in transformers config terms."""

    architecture: str
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...]
    conv_bias: bool
    feat_extract_norm: str  # "group" (layer 0 only) | "layer" (every conv layer)
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int

    def as_config(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in self.__dict__.items() if key != "architecture"}


# ------------------------------------------------------------------------------------------- reading


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of a release: the file itself, or ``model.safetensors`` / the one ``.ckpt``
    in a folder (a hub snapshot or a Zenodo download)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    pickles = sorted(p for p in path.iterdir() if p.suffix in TORCH_PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return pickles[0]
    raise ConversionError(f"{path}: expected model.safetensors or one {'/'.join(TORCH_PICKLE_SUFFIXES)} file, "
                          f"found {[p.name for p in pickles] or 'neither'}")


def read_state_dict(path: str | Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a torch pickle loaded with ``weights_only=True``
    (an untrusted pickle never runs code: one that needs more than tensors and containers is refused).

    ``lazy``: no data read (``posttrain.models.tensor_files``): a safetensors file's tensors as meta
    tensors (names and shapes; read each with ``read_safetensor``), a pickle's backed by the file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, lazy=lazy)
    if path.suffix not in TORCH_PICKLE_SUFFIXES:
        raise ConversionError(f"{path}: unknown checkpoint type (expected .safetensors or "
                              f"{'/'.join(TORCH_PICKLE_SUFFIXES)})")
    try:
        state = mapped_pickle(path) if lazy else torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(f"{path}: a legacy pickle checkpoint that needs {pickle_globals(error)} to load; "
                              "posttrain never runs code from a checkpoint. Convert it to safetensors where "
                              "you trust it, or use the release's model.safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    return state


def read_safetensors(path: Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return safetensors_meta(path) if lazy else load_file(path)
    except SafetensorError as error:
        raise corrupt_safetensors(path, error) from None


def corrupt_safetensors(path: Path, error: Exception) -> ConversionError:
    return ConversionError(f"{path}: not a readable safetensors file ({error}); the download may be truncated "
                           "or corrupt: download it again")


def pickle_globals(error: pickle.UnpicklingError) -> str:
    """The code a refused pickle asked for, from torch's message (not torch's advice to run it)."""
    names = re.findall(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(error))
    return f"code ({', '.join(dict.fromkeys(names))})" if names else "code"


# ------------------------------------------------------------------------------------------ mapping


def _indices(keys: set[str], pattern: str) -> list[int]:
    found = {int(match.group(1)) for key in keys if (match := re.fullmatch(pattern, key))}
    return list(range(max(found) + 1)) if found else []


def _require(state: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{where}: missing required key {ENCODER_PREFIX}{key}")
    return state[key]


def infer_shape(encoder_state: dict[str, torch.Tensor], where: str = "checkpoint") -> FairseqShape:
    """The encoder shape from fairseq tensor names and sizes (keys relative to ``m_ssl.model.``)."""
    keys = set(encoder_state)
    conv_layers = _indices(keys, r"feature_extractor\.conv_layers\.(\d+)\.0\.weight")
    layers = _indices(keys, r"encoder\.layers\.(\d+)\..*")
    if not conv_layers:
        raise ConversionError(f"{where}: missing required key {ENCODER_PREFIX}feature_extractor.conv_layers.0.0.weight")
    if not layers:
        raise ConversionError(f"{where}: missing required key {ENCODER_PREFIX}encoder.layers.0.fc1.weight")
    convs = [_require(encoder_state, f"feature_extractor.conv_layers.{i}.0.weight", where) for i in conv_layers]
    if "feature_extractor.conv_layers.0.2.1.weight" in keys:
        norm = "layer"
    elif "feature_extractor.conv_layers.0.2.weight" in keys:
        norm = "group"
    else:
        conv_norm = f"{ENCODER_PREFIX}feature_extractor.conv_layers.0.2"
        raise ConversionError(f"{where}: missing required key {conv_norm}.1.weight (layer-norm extractor) "
                              f"or {conv_norm}.weight (group-norm extractor)")
    family = fairseq_family(keys)
    if not family.fairseq_convertible:
        raise ConversionError(f"{where}: a {family.name} checkpoint in the fairseq layout (it holds "
                              f"{family.fairseq_markers[0]}...); posttrain converts only "
                              f"{', '.join(b.name for b in BACKBONES.values() if b.fairseq_convertible)} fairseq "
                              f"checkpoints: load {family.name} from a transformers checkpoint (a hub id or a local "
                              f"folder with config.json) instead")
    hidden_size = _require(encoder_state, "encoder.layers.0.fc1.weight", where).shape[1]
    pos_conv = _require(encoder_state, "encoder.pos_conv.0.weight_v", where)
    return FairseqShape(
        architecture=family.name,
        conv_dim=tuple(int(w.shape[0]) for w in convs), conv_kernel=tuple(int(w.shape[2]) for w in convs),
        conv_bias="feature_extractor.conv_layers.0.0.bias" in keys, feat_extract_norm=norm,
        hidden_size=int(hidden_size), num_hidden_layers=len(layers),
        intermediate_size=int(_require(encoder_state, "encoder.layers.0.fc1.weight", where).shape[0]),
        num_conv_pos_embeddings=int(pos_conv.shape[2]),
        num_conv_pos_embedding_groups=int(hidden_size // pos_conv.shape[1]))


# fairseq transformer-layer module -> transformers module, for every weight and bias
_LAYER_MODULES = {"self_attn.q_proj": "attention.q_proj", "self_attn.k_proj": "attention.k_proj",
                  "self_attn.v_proj": "attention.v_proj", "self_attn.out_proj": "attention.out_proj",
                  "self_attn_layer_norm": "layer_norm", "fc1": "feed_forward.intermediate_dense",
                  "fc2": "feed_forward.output_dense", "final_layer_norm": "final_layer_norm"}
_TOP_MODULES = {"layer_norm": "feature_projection.layer_norm", "post_extract_proj": "feature_projection.projection",
                "encoder.layer_norm": "encoder.layer_norm"}


def fairseq_key_map(shape: FairseqShape) -> dict[str, str]:
    """Every fairseq encoder key the shape requires -> its transformers ``*Model`` key."""
    mapping: dict[str, str] = {}

    def module(fairseq: str, transformers: str, params: tuple[str, ...] = ("weight", "bias")) -> None:
        mapping.update({f"{fairseq}.{p}": f"{transformers}.{p}" for p in params})

    for i in range(len(shape.conv_dim)):
        conv = f"feature_extractor.conv_layers.{i}"
        module(f"{conv}.0", f"{conv}.conv", ("weight", "bias") if shape.conv_bias else ("weight",))
        if shape.feat_extract_norm == "layer":  # Sequential(TransposeLast, LayerNorm, TransposeLast)
            module(f"{conv}.2.1", f"{conv}.layer_norm")
        elif i == 0:  # GroupNorm on the first conv layer only
            module(f"{conv}.2", f"{conv}.layer_norm")
    for fairseq, transformers in _TOP_MODULES.items():
        module(fairseq, transformers)
    # weight norm over dim 2: g -> original0, v -> original1 (torch parametrizations in transformers 5)
    mapping.update({"encoder.pos_conv.0.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
                    "encoder.pos_conv.0.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
                    "encoder.pos_conv.0.bias": "encoder.pos_conv_embed.conv.bias"})
    for layer in range(shape.num_hidden_layers):
        for fairseq, transformers in _LAYER_MODULES.items():
            module(f"encoder.layers.{layer}.{fairseq}", f"encoder.layers.{layer}.{transformers}")
    return mapping


def to_detector_state(state: dict[str, torch.Tensor], where: str = "checkpoint"
                      ) -> tuple[FairseqShape, dict[str, torch.Tensor], list[str]]:
    """fairseq-layout state -> (shape, Detector state dict, pre-training keys ignored)."""
    shape, sources, ignored = detector_sources(state, where)
    converted = {key: (state[source] if isinstance(source, str) else source).to(torch.float32)
                 for key, source in sources.items()}
    return shape, converted, ignored


def detector_sources(state: dict[str, torch.Tensor], where: str = "checkpoint"
                     ) -> tuple[FairseqShape, dict[str, str | torch.Tensor], list[str]]:
    """fairseq-layout state -> (shape, where each Detector key comes from, pre-training keys ignored).
    A source is the key in ``state``, or a tensor made here (the identity projection fairseq omits).
    Only the names and shapes of ``state`` are read: meta tensors do."""
    if not any(key.startswith(ENCODER_PREFIX) for key in state) and any(key.startswith(TRANSFORMERS_PREFIXES)
                                                                         for key in state):
        raise ConversionError(f"{where}: already a transformers export (no conversion needed): pass its folder "
                              "as --model, or publish it as it is")
    encoder_state: dict[str, torch.Tensor] = {}
    origin: dict[str, str | torch.Tensor] = {}
    head_keys = OC_HEAD_KEYS if release_head(state) == OC_SOFTMAX else HEAD_KEYS
    for key, tensor in state.items():
        if key in head_keys:
            continue
        if not key.startswith(ENCODER_PREFIX):
            raise ConversionError(f"{where}: unknown key {key!r} (expected {ENCODER_PREFIX}* or proj_fc.*)")
        name = key[len(ENCODER_PREFIX):]
        name = POS_CONV_ALIASES.get(name, name)
        encoder_state[name], origin[name] = tensor, key
    shape = infer_shape(encoder_state, where)
    if "post_extract_proj.weight" not in encoder_state and shape.conv_dim[-1] == shape.hidden_size:
        # fairseq builds no projection when the conv width equals the encoder width; transformers
        # always has one: the identity
        origin["post_extract_proj.weight"] = torch.eye(shape.hidden_size)
        origin["post_extract_proj.bias"] = torch.zeros(shape.hidden_size)
    mapping = fairseq_key_map(shape)
    sources: dict[str, str | torch.Tensor] = {}
    ignored = []
    for key, source in origin.items():
        if key in mapping:
            sources[f"encoder.{mapping[key]}"] = source
        elif PRETRAINING_ONLY.match(key):
            ignored.append(ENCODER_PREFIX + key)
        else:
            raise ConversionError(f"{where}: unknown key {ENCODER_PREFIX + key!r} (neither an encoder weight "
                                  f"of this {shape.architecture} shape nor a known pre-training module)")
    missing = [ENCODER_PREFIX + key for key in mapping if key not in origin]
    missing += [key for key in head_keys if key not in state]
    if missing:
        raise ConversionError(f"{where}: missing required key(s) {missing[:5]}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    sources.update({detector_key: key for key, detector_key in head_keys.items()})
    return shape, sources, sorted(ignored)


def release_head(state: dict[str, torch.Tensor]) -> str:
    """The head kind of a release (names and shapes only): ``oc_softmax`` for AD's ``OCAngleLayer`` (a
    ``proj_fc.weight`` of one column and no ``proj_fc.bias``), else ``linear`` (``proj_fc``, 2 x D + bias)."""
    weight = state.get("proj_fc.weight")
    oc = weight is not None and "proj_fc.bias" not in state and weight.ndim == 2 and weight.shape[1] == 1
    return OC_SOFTMAX if oc else LINEAR


def choose_preset(shape: FairseqShape, preset: str | None = None, where: str = "checkpoint") -> tuple[str, list[str]]:
    """The preset for ``shape`` (``preset`` if given, checked) and every preset with that shape."""
    # a HuBERT without its pre-training label embeddings reads as wav2vec 2.0: a named preset decides
    architecture = PRESETS[preset].architecture if preset in PRESETS else shape.architecture
    matches = matching_presets(architecture, shape.as_config())
    if preset is not None:
        if preset not in matches:
            raise ConversionError(f"{where}: preset {preset!r} does not have this checkpoint's shape "
                                  f"{architecture} {shape.as_config()} (presets that do: {matches or 'none'})")
        return preset, matches
    if not matches:
        raise ConversionError(f"{where}: no preset has the shape {shape.architecture} {shape.as_config()}; "
                              f"add one to posttrain.models.presets")
    return matches[0], matches


# ---------------------------------------------------------------------------------------- converting


def convert_checkpoint(path: str | Path, *, preset: str | None = None,
                       repo_id: str | None = None) -> tuple[Detector, dict[str, Any]]:
    """A release (file or folder; ``repo_id`` when it came from the hub) -> ``(Detector, identity)``.

    ``identity`` carries ``preset``, ``license`` and ``source`` ready for ``export.identity_document``.
    """
    weights = checkpoint_file(path)
    where = str(weights)
    tensors = read_state_dict(weights)
    shape, state, ignored = to_detector_state(tensors, where)
    name, matches = choose_preset(shape, _released_preset(preset, repo_id), where)
    detector = release_shell(name, release_head(tensors))
    detector.load_state_dict(state, strict=True, assign=True)
    return detector.eval(), _identity(name, repo_id, weights, matches, ignored)


def open_release(path: str | Path, *, preset: str | None = None, repo_id: str | None = None
                 ) -> tuple[Detector, dict[str, Any], Callable[[], TensorReaders]]:
    """``convert_checkpoint`` without reading the weights: ``(shell, identity, open_readers)``, the shell
    a meta-device detector (its config and identity), ``open_readers()`` a reader of each Detector tensor
    (for ``posttrain.models.partitioned.load_into_partitions``). Same errors as ``convert_checkpoint``."""
    weights = checkpoint_file(path)
    where = str(weights)
    tensors = read_state_dict(weights, lazy=True)
    shape, sources, ignored = detector_sources(tensors, where)
    name, matches = choose_preset(shape, _released_preset(preset, repo_id), where)
    return (release_shell(name, release_head(tensors)), _identity(name, repo_id, weights, matches, ignored),
            lambda: _release_readers(weights, tensors, sources))


def release_shell(preset: str, head: str = LINEAR) -> Detector:
    """A meta-device detector of ``preset`` and ``head`` (``release_head``; AD's default OC margins and scale)
    with AntiDeepfake's input normalisation in its config."""
    with torch.device("meta"):  # the weights come from the file: skip random init
        detector = build_detector(ModelConfig(preset=preset, head=head))
    # scored (and fine-tuned) with the normalisation AntiDeepfake trained it with; kept in the config,
    # so exports and checkpoints of this model and of models fine-tuned from it keep it too
    setattr(detector.ssl_config, INPUT_EPS_FIELD, ANTIDEEPFAKE_INPUT_EPS)
    return detector


def _released_preset(preset: str | None, repo_id: str | None) -> str | None:
    if preset is None and repo_id in released_checkpoints():
        return released_checkpoints()[repo_id]
    return preset


def _identity(name: str, repo_id: str | None, weights: Path, matches: list[str], ignored: list[str]) -> dict[str, Any]:
    return {"preset": name, "license": LICENSE, "base_model": repo_id,
            "source": {"kind": "antideepfake", "repo_id": repo_id, "path": str(weights),
                       "sha256": file_sha256(weights), "architecture_matches": matches,
                       "ignored_pretraining_keys": ignored}}


def _release_readers(weights: Path, tensors: dict[str, torch.Tensor],
                     sources: dict[str, str | torch.Tensor]) -> TensorReaders:
    """A reader per Detector key: one safetensors tensor read on demand, a file-backed pickle tensor, or
    a tensor made by the conversion; each as fp32, as ``to_detector_state`` converts it."""
    def reader(source: str | torch.Tensor) -> Callable[[], torch.Tensor]:
        if not isinstance(source, str):
            return lambda: source.to(torch.float32)
        if weights.suffix == ".safetensors":
            return lambda: read_safetensor(weights, source).to(torch.float32)
        return lambda: tensors[source].to(torch.float32)

    return {key: reader(source) for key, source in sources.items()}
