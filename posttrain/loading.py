"""Resolve a ``--model`` argument to a ``Detector`` and the identity of what was loaded.

Accepted everywhere a model is asked (``posttrain eval``, ``score``, ``sharpness``, ``embed``,
``finetune.py``):

- a transformers export folder (``posttrain publish`` / ``hub convert`` output, or any two-label
  wav2vec 2.0 / HuBERT audio classifier labelled fake/real);
- a posttrain DeepSpeed checkpoint folder or one of its tag folders (consolidated to fp32);
- an AntiDeepfake release: its ``model.safetensors`` / SpeechBrain ``.ckpt`` file or a folder holding it;
- a Hugging Face repo id (``owner/name``), fetched with ``snapshot_download`` into the normal cache
  (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses the cache only), then read as one of the above.

``load_scorer`` also takes an ONNX export (``posttrain export --format onnx``) with the onnxruntime backend
(``score``, ``eval`` and ``serve --backend onnxruntime``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.errors import UserError
from posttrain.eval.onnx_runtime import OnnxModel, is_onnx_dir
from posttrain.hub import antideepfake, export
from posttrain.hubcache import locate_model
from posttrain.models.detector import Detector

FORMATS = ("transformers", "antideepfake", "checkpoint")
CHECKPOINT_MARKERS = ("posttrain.json", "latest", "checkpoints")
# (the SSL config a model spec holds, its identity) -> the detector its weights are read into
Builder = Callable[[dict[str, Any], dict[str, Any]], Detector]
# checkpoint metadata worth publishing (the loader/scheduler/step states only matter for resuming)
TRAINING_KEYS = ("tag", "config", "progress", "step_mode", "world_size", "zero_stage", "precision",
                 "mlflow_run_id", "saved_unix_s")


def model_format(path: str | Path) -> str:
    """Which kind of model ``path`` holds (one of ``FORMATS``)."""
    path = Path(path)
    if path.is_file():
        return "antideepfake"
    if is_onnx_dir(path):  # before the checkpoint markers: an ONNX export holds a posttrain.json too
        raise UserError(f"{path}: an ONNX export (model.onnx): score it with --backend onnxruntime (posttrain score, "
                        f"eval, serve), or give the model it was exported from")
    weights = path / "model.safetensors"
    if weights.is_file() and _has_fairseq_layout(weights):
        return "antideepfake"  # its hub folder may hold a non-transformers config.json as well
    if export.is_export_dir(path):
        return "transformers"
    # a tag folder (posttrain.json, written last), a checkpoints root (latest) or a run folder; checked
    # before the release pickles because DeepSpeed's tag folders hold .pt files too
    if any((path / marker).exists() for marker in CHECKPOINT_MARKERS):
        return "checkpoint"
    if weights.is_file() or any(p.suffix in antideepfake.TORCH_PICKLE_SUFFIXES for p in path.iterdir()):
        return "antideepfake"
    raise FileNotFoundError(f"{path}: not a model folder (expected a transformers export with config.json, "
                            f"a posttrain checkpoint, or an AntiDeepfake model.safetensors / .ckpt)")


def _has_fairseq_layout(weights: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as handle:  # reads the header only
            return any(key.startswith(antideepfake.ENCODER_PREFIX) for key in handle.keys())
    except SafetensorError as error:
        raise antideepfake.corrupt_safetensors(weights, error) from None


def load_model(spec: str | Path, device: str | torch.device = "cpu", *, preset: str | None = None,
               build: Builder | None = None) -> tuple[Detector, dict[str, Any]]:
    """``(Detector in eval mode on device, identity)`` for any accepted model spec (see the module doc).

    ``identity`` is the ``posttrain.json`` document of the model (preset, SSL config, head, score definition,
    calibration, licence, provenance) plus ``loaded_from`` (spec, resolved path, format). ``preset`` only
    helps an AntiDeepfake conversion choose among presets of identical shape. Every format keeps its head:
    a checkpoint's from its saved config, an AntiDeepfake release's from its ``proj_fc`` tensors (a
    transformers export is always linear).

    ``build(ssl_config, identity)``: the detector to read the weights into, built in ZeRO-3 partitions
    (``posttrain.models.partitioned``; it stays where it was built, ``device`` aside), with the head
    ``identity["head"]`` names (its ``model.*`` settings; another head is a one-line error). The weights then
    go in one module at a time from rank 0 (collective): no rank ever holds a full state dict.
    """
    path, repo_id = locate_model(spec)
    kind = model_format(path)
    if build is not None:
        detector, identity = _load_into(build, path, kind, preset, repo_id)
    elif kind == "transformers":
        detector, identity = export.load_export(path)
    elif kind == "antideepfake":
        detector, identity = convert_release(path, preset=preset, repo_id=repo_id)
    else:
        detector, identity = detector_from_checkpoint(path)
    identity = {**identity, "loaded_from": {"spec": str(spec), "path": str(path), "format": kind,
                                            "repo_id": repo_id}}
    return (detector if build is not None else detector.to(device)).eval(), identity


def load_scorer(spec: str | Path, device: str | torch.device = "cpu", *, backend: str = "torch",
                threads: int | None = None) -> tuple[Detector | OnnxModel, dict[str, Any]]:
    """``(model, identity)`` for the inference core (``posttrain.eval.inference``): ``load_model`` for the torch
    backend; an ONNX export folder run by onnxruntime on the CPU (``threads`` intra-op threads) otherwise."""
    if backend == "torch":
        return load_model(spec, device)
    if torch.device(device).type != "cpu":
        raise UserError(f"--device {device}: the onnxruntime backend runs on the CPU; drop --device")
    path, repo_id = locate_model(spec)
    model = OnnxModel(path, threads=threads, int8=backend == "onnxruntime-int8")
    identity = {**model.identity, "loaded_from": {"spec": str(spec), "path": str(path), "format": "onnx",
                                                  "repo_id": repo_id, "backend": backend}}
    return model, identity


def _load_into(build: Builder, path: Path, kind: str, preset: str | None,
               repo_id: str | None) -> tuple[Detector, dict[str, Any]]:
    """``build``'s partitioned detector, filled from ``path`` (a ``kind`` model) module by module."""
    from posttrain.models.partitioned import load_into_partitions

    if kind == "transformers":
        shell, identity, open_readers = export.open_export(path)
    elif kind == "antideepfake":
        shell, found, open_readers = antideepfake.open_release(path, preset=preset, repo_id=repo_id)
        identity = release_identity(shell, found)
    else:
        shell, identity, open_readers = _open_checkpoint(path)
    detector = build(shell.ssl_config.to_dict(), identity)
    if detector.head_settings != shell.head_settings:  # else the head's tensors would not fit (or mean) the same
        wanted = " ".join(f"model.{key}={value}" for key, value in shell.head_settings.items())
        raise ConfigError("model.head", f"{path} has the head {wanted} (its identity's 'head'), the detector built "
                                        f"for it has model.head={detector.head_settings['head']}: set {wanted}")
    load_into_partitions(detector, open_readers)
    return detector, identity


def convert_release(path: str | Path, *, preset: str | None = None,
                    repo_id: str | None = None) -> tuple[Detector, dict[str, Any]]:
    """An AntiDeepfake release -> ``(Detector, posttrain.json identity)``."""
    detector, found = antideepfake.convert_checkpoint(path, preset=preset, repo_id=repo_id)
    return detector, release_identity(detector, found)


def release_identity(detector: Detector, found: dict[str, Any]) -> dict[str, Any]:
    """The identity document of a converted AntiDeepfake release (``found``: what the conversion found)."""
    return export.identity_document(detector, preset=found["preset"], license_id=found["license"],
                                    base_model=found["base_model"], source=found["source"])


def detector_from_checkpoint(path: str | Path) -> tuple[Detector, dict[str, Any]]:
    """A posttrain DeepSpeed checkpoint (folder, tag folder or run folder) -> ``(Detector, identity)``,
    consolidated to fp32. Only for checkpoints you trust: DeepSpeed's files are pickles."""
    from posttrain.train.checkpoint import load_detector_from_checkpoint

    detector, metadata = load_detector_from_checkpoint(path)
    return detector, checkpoint_identity(detector, metadata, path)


def _open_checkpoint(path: Path) -> tuple[Detector, dict[str, Any], Any]:
    """``detector_from_checkpoint`` without consolidating: ``(meta-device shell, identity, open_readers)``."""
    from posttrain.models.detector import build_detector
    from posttrain.train.checkpoint import model_config_from_metadata, open_checkpoint

    metadata, open_readers = open_checkpoint(path)
    with torch.device("meta"):
        shell = build_detector(model_config_from_metadata(metadata), ssl_config=metadata["ssl_config"])
    return shell, checkpoint_identity(shell, metadata, path), open_readers


def checkpoint_identity(detector: Detector, metadata: dict[str, Any], path: str | Path) -> dict[str, Any]:
    from posttrain.train.checkpoint import resolve_checkpoint

    config = metadata.get("config") or {}
    training = {key: metadata[key] for key in TRAINING_KEYS if key in metadata}
    return export.identity_document(
        detector, preset=metadata.get("preset"), base_model=(config.get("model") or {}).get("pretrained"),
        source={"kind": "checkpoint", "path": str(resolve_checkpoint(path))}, training=training)
