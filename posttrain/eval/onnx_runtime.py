"""The onnxruntime scoring backend: a folder ``posttrain export --format onnx`` wrote, scoring windows on
the CPU where the torch ``Detector`` would (``posttrain score|eval --backend onnxruntime``).

The graph takes raw zero-padded 16 kHz audio and the valid lengths and normalises inside
(``posttrain.hub.onnx_export``), so a batch of windows goes in as ``Batch.collate`` pads it for the torch
model, before its ``Detector.normalise``. What a torch model says about itself (its encoder config, for the
shortest input; its score definition) is read from the folder's ``posttrain.json``. Beside ``logits`` the
graph outputs ``embedding``, the pooled embedding the head takes (``Detector.embed``; drift monitoring and
``embed`` use it); an export made before it had that output still scores and has no embedding (None).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PretrainedConfig

from posttrain.errors import UserError
from posttrain.models.backbones import get_backbone
from posttrain.models.heads import build_head, score_definition
from posttrain.models.score_definitions import ScoreDefinition

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
IDENTITY_NAME = "posttrain.json"
INPUT_NAMES = ("waveforms", "lengths")
OUTPUT_NAME = "logits"
EMBEDDING_NAME = "embedding"
OUTPUT_NAMES = (OUTPUT_NAME, EMBEDDING_NAME)  # the graph's outputs, in this order


def is_onnx_dir(path: str | Path) -> bool:
    """A folder ``posttrain export --format onnx`` wrote (its ``model.onnx``)."""
    return (Path(path) / ONNX_NAME).is_file()


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` (``threads``: intra-op threads; None = onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def padded(waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(waveforms [B, longest] float32 zero-padded, lengths [B] int64)``: the graph's inputs."""
    lengths = np.array([len(wave) for wave in waves], dtype=np.int64)
    batch = np.zeros((len(waves), int(lengths.max(initial=0))), dtype=np.float32)
    for row, wave in enumerate(waves):
        batch[row, :len(wave)] = wave
    return batch, lengths


class OnnxModel:
    """An ONNX export folder as the inference core's model (``posttrain.eval.inference``): ``logits`` (and
    ``embedding``) of raw windows, the encoder config and score definition of the model it was exported from."""

    def __init__(self, folder: str | Path, *, threads: int | None = None, int8: bool = False):
        self.folder = Path(folder)
        if not is_onnx_dir(self.folder):
            raise UserError(f"{self.folder}: not an ONNX export (no {ONNX_NAME}); make one with "
                            f"`posttrain export --format onnx MODEL --out DIR`, or drop --backend onnxruntime")
        self.identity = read_onnx_identity(self.folder)
        name = INT8_NAME if int8 else ONNX_NAME
        self.int8 = int8
        if not (self.folder / name).is_file():
            raise UserError(f"{self.folder}: no {name} (export with --quantize int8)")
        self.path = self.folder / name
        self.session = session(self.path, threads)
        self.has_embedding = EMBEDDING_NAME in {output.name for output in self.session.get_outputs()}
        self.ssl_config: PretrainedConfig = get_backbone(self.identity["architecture"]).config_class.from_dict(
            self.identity["ssl_config"])
        head = build_head(self.identity.get("head"), self.ssl_config.hidden_size)
        self.score_definition: ScoreDefinition = score_definition(head)
        recorded = self.identity.get("score_definition")
        if recorded not in (None, self.score_definition.name):
            raise UserError(f"{self.folder / IDENTITY_NAME}: score_definition {recorded!r} does not match its head "
                            f"{self.identity.get('head')} ({self.score_definition.name})")

    def eval(self) -> "OnnxModel":  # the torch model's interface; an ONNX graph has no training mode
        return self

    def logits(self, waves: list[np.ndarray]) -> np.ndarray:
        """``[B, 2]`` float32 outputs of raw (un-normalised) 16 kHz windows (``outputs``)."""
        return self.outputs(waves)[0]

    def outputs(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits [B, 2], embedding [B, D])`` float32 of raw windows, batched with zero padding; the
        embedding is None for an export without that output (``no_embedding_reason``). The int8 graph runs
        each window alone: dynamic quantisation takes one scale per activation tensor, over the whole batch
        and its padding, so batched, a window's score would depend on the windows beside it (in ``serve``:
        on other clients' files)."""
        if self.int8 and len(waves) > 1:
            alone = [self.outputs([wave]) for wave in waves]
            embeddings = [embedding for _, embedding in alone]
            return (np.concatenate([logits for logits, _ in alone]),
                    None if embeddings[0] is None else np.concatenate(embeddings))
        inputs, lengths = padded(waves)
        names = list(OUTPUT_NAMES) if self.has_embedding else [OUTPUT_NAME]
        results = self.session.run(names, {INPUT_NAMES[0]: inputs, INPUT_NAMES[1]: lengths})
        return results[0], results[1] if self.has_embedding else None

    @property
    def no_embedding_reason(self) -> str:
        """Why this export gives no embedding, and the fix (one line)."""
        return (f"{self.path}: no '{EMBEDDING_NAME}' output (exported before posttrain's ONNX graph had one); "
                f"export the model again with `posttrain export --format onnx MODEL --out DIR`, or use the torch model")


def read_onnx_identity(folder: Path) -> dict[str, Any]:
    path = folder / IDENTITY_NAME
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; an ONNX export of posttrain carries its identity there") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not JSON: {error}") from None
    missing = [key for key in ("architecture", "ssl_config") if key not in identity]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} (not written by `posttrain export --format onnx`)")
    return identity
