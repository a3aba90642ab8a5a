"""Resolve a ``--model`` argument to a ``Detector`` and the identity of what was loaded.

Accepted everywhere a model is asked (``posttrain eval``, ``score``, ``sharpness``, ``embed``,
``finetune.py``):

- a transformers export folder (``posttrain publish`` / ``hub convert`` output, or any two-label
  wav2vec 2.0 / HuBERT audio classifier labelled fake/real);
- a posttrain DeepSpeed checkpoint folder or one of its tag folders (consolidated to fp32);
- an AntiDeepfake release: its ``model.safetensors`` / SpeechBrain ``.ckpt`` file or a folder holding it;
- a Hugging Face repo id (``owner/name``), fetched with ``snapshot_download`` into the normal cache
  (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses the cache only), then read as one of the above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.hub import antideepfake, export
from posttrain.hubcache import locate_model
from posttrain.models.detector import Detector

FORMATS = ("transformers", "antideepfake", "checkpoint")
CHECKPOINT_MARKERS = ("posttrain.json", "latest", "checkpoints")
# checkpoint metadata worth publishing (the loader/scheduler/step states only matter for resuming)
TRAINING_KEYS = ("tag", "config", "progress", "step_mode", "world_size", "zero_stage", "precision",
                 "mlflow_run_id", "saved_unix_s")


def model_format(path: str | Path) -> str:
    """Which kind of model ``path`` holds (one of ``FORMATS``)."""
    path = Path(path)
    if path.is_file():
        return "antideepfake"
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


def load_model(spec: str | Path, device: str | torch.device = "cpu", *,
               preset: str | None = None) -> tuple[Detector, dict[str, Any]]:
    """``(Detector in eval mode on device, identity)`` for any accepted model spec (see the module doc).

    ``identity`` is the ``posttrain.json`` document of the model (preset, SSL config, calibration,
    licence, provenance) plus ``loaded_from`` (spec, resolved path, format). ``preset`` only helps an
    AntiDeepfake conversion choose among presets of identical shape.
    """
    path, repo_id = locate_model(spec)
    kind = model_format(path)
    if kind == "transformers":
        detector, identity = export.load_export(path)
    elif kind == "antideepfake":
        detector, identity = convert_release(path, preset=preset, repo_id=repo_id)
    else:
        detector, identity = detector_from_checkpoint(path)
    identity = {**identity, "loaded_from": {"spec": str(spec), "path": str(path), "format": kind,
                                            "repo_id": repo_id}}
    return detector.to(device).eval(), identity


def convert_release(path: str | Path, *, preset: str | None = None,
                    repo_id: str | None = None) -> tuple[Detector, dict[str, Any]]:
    """An AntiDeepfake release -> ``(Detector, posttrain.json identity)``."""
    detector, found = antideepfake.convert_checkpoint(path, preset=preset, repo_id=repo_id)
    return detector, export.identity_document(detector, preset=found["preset"], license_id=found["license"],
                                              base_model=found["base_model"], source=found["source"])


def detector_from_checkpoint(path: str | Path) -> tuple[Detector, dict[str, Any]]:
    """A posttrain DeepSpeed checkpoint (folder, tag folder or run folder) -> ``(Detector, identity)``,
    consolidated to fp32. Only for checkpoints you trust: DeepSpeed's files are pickles."""
    from posttrain.train.checkpoint import load_detector_from_checkpoint, resolve_checkpoint

    detector, metadata = load_detector_from_checkpoint(path)
    config = metadata.get("config") or {}
    training = {key: metadata[key] for key in TRAINING_KEYS if key in metadata}
    return detector, export.identity_document(
        detector, preset=metadata.get("preset"), base_model=(config.get("model") or {}).get("pretrained"),
        source={"kind": "checkpoint", "path": str(resolve_checkpoint(path))}, training=training)
