"""posttrain ``Detector`` -> an ONNX graph that scores raw 16 kHz audio, and the folder it is shared in.

The graph (``RawAudioGraph``) takes ``waveforms`` (float32 ``[batch, samples]``, raw zero-padded 16 kHz
audio, dynamic batch and length) and ``lengths`` (int64 ``[batch]``, valid samples per row) and returns
``logits`` (float32 ``[batch, 2]``, [fake, real]; ``[-cos, cos]`` for a one-class head) and ``embedding``
(float32 ``[batch, hidden]``, the pooled embedding the head takes: ``Detector.embed``): the model's own
per-utterance normalisation (``Detector.normalise``, its eps) is inside, the padding mask is derived from
``lengths`` inside, so it takes audio exactly as ``posttrain score`` hands windows to the torch model.

Exporter: ``torch.export.export(strict=True)`` then ``torch.onnx.export(dynamo=True)`` (onnxscript).
Strict (dynamo) tracing because ``Detector.frame_mask`` sizes a mask by ``int(lengths.max())``: non-strict
export stops at that data-dependent size, dynamo carries it as a symbolic size (the graph computes it).
The group norm of "group" feature extractors always takes its masked statistics while traced
(``posttrain.models.masked_norm.traceable_group_norm``), since its all-valid fast path is a data-dependent
branch. The TorchScript exporter (``dynamo=False``) is not used: it freezes ``int(lengths.max())`` to the
example's value, which silently scores longer inputs wrong. wav2vec 2.0's weight-normed positional conv
and sdpa attention export as they are.

Every export is checked: onnxruntime against the torch model on ``probe_waveform`` at -60..0 dBFS, batch 1
and a padded batch, within ``PARITY_TOLERANCE`` (the logits; the embedding's difference is measured too);
the measured differences go into ``posttrain.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.eval.onnx_runtime import (EMBEDDING_NAME, INPUT_NAMES, INT8_NAME, ONNX_NAME, OUTPUT_NAME, OUTPUT_NAMES,
                                         padded, session)
from posttrain.hub.export import GAP_LEVELS_DBFS, ID2LABEL, IDENTITY_NAME, probe_waveform
from posttrain.hub.folders import ExportError, write_export_folder
from posttrain.hub.onnx_card import render_onnx_card
from posttrain.models.detector import Detector
from posttrain.models.masked_norm import traceable_group_norm

LABELS_NAME = "labels.json"
CALIBRATION_NAME = "calibration.json"
DIM_NAMES = ("batch", "samples")  # the dynamic axes of waveforms
OPSET = 18
QUANTIZATIONS = ("int8",)
EXPORT_KIND = "onnx"  # the kind of folder ``posttrain export --format onnx`` writes (hub.folders)
PARITY_TOLERANCE = 1e-4  # max |logit difference| onnxruntime vs torch an export must meet
EXPORTER = "torch.export.export(strict=True) + torch.onnx.export(dynamo=True)"
EXTERNAL_DATA_NAME = "model.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this are stored beside the graph (protobuf stops at 2 GB)
ATTENTION_KERNELS = ("eager", "sdpa")  # what the exporter traces (flash attention has no ONNX form)


class RawAudioGraph(nn.Module):
    """What the ONNX graph computes: raw zero-padded audio and lengths -> ``(logits, embedding)`` of its
    normalised input (the model's own normalisation, padding masked by ``lengths``): ``Detector.forward``
    split at the head's input, so the embedding comes from the pass that scores."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.detector.embed(self.detector.normalise(waveforms, lengths), lengths)
        return self.detector.head(embedding), embedding


def example_inputs(seconds: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded two-row batch of the probe (the second row 3/4 long) to trace with."""
    wave = torch.from_numpy((0.1 * probe_waveform(seconds)).astype(np.float32))
    short = wave.numel() * 3 // 4
    waveforms = torch.stack([wave, torch.cat([wave[:short], torch.zeros(wave.numel() - short)])])
    return waveforms, torch.tensor([wave.numel(), short], dtype=torch.int64)


def save_onnx_model(detector: Detector, path: Path) -> None:
    """Export ``RawAudioGraph(detector)`` (module docstring) to ``path``; weights past ``EXTERNAL_DATA_BYTES``
    (protobuf's 2 GB limit: xlsr_1b and up) go to ``model.onnx.data`` beside it, which onnxruntime reads."""
    import onnx

    external = sum(p.numel() * p.element_size() for p in detector.parameters()) > EXTERNAL_DATA_BYTES
    onnx_program(detector).save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)  # the graph only: rename its axes in place
    _name_dynamic_axes(model)
    onnx.save_model(model, str(path))


def onnx_program(detector: Detector):
    """The ``torch.onnx.ONNXProgram`` of ``RawAudioGraph(detector)`` (module docstring)."""
    kernel = getattr(detector.ssl_config, "_attn_implementation", "eager") or "eager"
    if kernel not in ATTENTION_KERNELS:
        raise ExportError(f"attn_implementation {kernel!r}: ONNX export traces {' or '.join(ATTENTION_KERNELS)} "
                          f"attention; load the model on the CPU (it then uses sdpa)")
    # its "torchvision is not installed" notes concern torchvision's ops, which a detector does not use
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    graph = RawAudioGraph(detector.float().eval()).eval()
    inputs = example_inputs()
    dynamic = torch.export.Dim.DYNAMIC
    shapes = {"waveforms": {0: dynamic, 1: dynamic}, "lengths": {0: dynamic}}
    with traceable_group_norm(detector.encoder), torch.no_grad(), warnings.catch_warnings():
        # dynamo's notes on transformers internals (lru_cache, side effects) and onnxscript's: none is ours
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(graph, inputs, dynamic_shapes=shapes, strict=True)
        exported = torch.onnx.export(program, inputs, dynamo=True, input_names=list(INPUT_NAMES),
                                     output_names=list(OUTPUT_NAMES), opset_version=OPSET, verbose=False)
    _free_output_names(exported.model)
    return exported


def _free_output_names(model) -> None:
    """Give another name to every other value named like an output. The exporter names values after their torch
    ops (WavLM's relative position bias makes an ``embedding``) and renames the outputs without looking: two
    values of one name make an invalid model."""
    from onnxscript import ir

    outputs = {id(value) for value in model.graph.outputs}
    values = [value for node in ir.traversal.RecursiveGraphIterator(model.graph) for value in node.outputs]
    taken = {value.name for value in values}
    for value in values:
        if value.name in OUTPUT_NAMES and id(value) not in outputs:
            value.name = next(name for name in (f"{value.name}_{index}" for index in itertools.count(1))
                              if name not in taken)
            taken.add(value.name)


def _name_dynamic_axes(model) -> None:
    """Name the exporter's symbolic dims (``s27``...) ``batch`` and ``samples`` everywhere they appear."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    renames = {dim.dim_param: name for dim, name in zip(dims, DIM_NAMES) if dim.dim_param}
    if not renames:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda match: renames[match.group(1)], dim.dim_param)


@torch.no_grad()
def parity(detector: Detector, onnx_path: str | Path, levels_dbfs=GAP_LEVELS_DBFS) -> dict[str, Any]:
    """Max |logit difference| (and |embedding difference|) onnxruntime vs torch on the probe at each level,
    batch 1 and padded (three rows of 1.0, 0.6 and 0.35 s)."""
    runner = session(onnx_path)
    probe = probe_waveform()
    rows: dict[str, dict[str, list[float]]] = {name: {"batch_1": [], "padded_batch": []} for name in OUTPUT_NAMES}
    for level in levels_dbfs:
        wave = (probe * 10.0 ** (level / 20.0)).astype(np.float32)
        for mode, waves in (("batch_1", [wave]), ("padded_batch", [wave, wave[:9600], wave[:5600]])):
            inputs, lengths = padded(waves)
            ours = runner.run(list(OUTPUT_NAMES), {"waveforms": inputs, "lengths": lengths})
            theirs = RawAudioGraph(detector)(torch.from_numpy(inputs), torch.from_numpy(lengths))
            for name, onnx_out, torch_out in zip(OUTPUT_NAMES, ours, theirs):
                rows[name][mode].append(float(np.abs(onnx_out.astype(np.float64) - torch_out.numpy()).max()))
    return {"levels_dbfs": list(levels_dbfs), "max_abs_logit_diff": rows[OUTPUT_NAME],
            "max_abs_embedding_diff": rows[EMBEDDING_NAME],
            "probe": "posttrain.hub.export.probe_waveform; padded batch rows 1.0, 0.6, 0.35 s"}


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights (``onnxruntime.quantization.quantize_dynamic``). The
    conv feature encoder stays float32: onnxruntime's ConvInteger is slow on the CPU (xlsr_300m, 4 s, 1 thread,
    AVX-512 VNNI: RTF 0.40 with the convs in int8 vs 0.27 without, fp32 0.62), and those convs read the raw
    waveform, where int8 rounding costs the most."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = (source.parent / EXTERNAL_DATA_NAME).is_file()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice on pre-processing and on the int64 shape tensors it leaves alone
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         use_external_data_format=external)
    finally:
        root.setLevel(level)


def labels_document(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``labels.json``: what the two outputs are and how they become the score of record."""
    return {"labels": [ID2LABEL[index] for index in sorted(ID2LABEL)],
            "id2label": {str(index): name for index, name in ID2LABEL.items()},
            "output": OUTPUT_NAME, "score_definition": identity.get("score_definition")}


def export_onnx(detector: Detector, out_dir: str | Path, identity: Mapping[str, Any], *,
                quantize: str | None = None, exported_from: str | None = None, overwrite: bool = False) -> Path:
    """Write the ONNX folder of ``detector`` into ``out_dir`` (replaced whole, atomically; the folder rules of
    ``posttrain.hub.folders``): ``model.onnx`` (+ ``model.int8.onnx``), ``labels.json``, ``calibration.json``
    (when the identity holds one), ``posttrain.json`` (the identity plus an ``onnx`` section) and the card."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize {quantize}: expected one of {list(QUANTIZATIONS)}")
    if identity.get("score_definition") not in (None, detector.score_definition.name):
        raise ExportError(f"identity score_definition {identity['score_definition']!r} is not the model's "
                          f"{detector.score_definition.name!r}")
    detector = detector.float().eval()

    def write(staging: Path) -> None:
        import onnx

        onnx_path = staging / ONNX_NAME
        save_onnx_model(detector, onnx_path)
        checked = parity(detector, onnx_path)
        worst = max(max(values) for values in checked["max_abs_logit_diff"].values())
        if not worst <= PARITY_TOLERANCE:
            raise ExportError(f"{ONNX_NAME}: onnxruntime's logits differ from torch's by {worst:.3g} "
                              f"(> {PARITY_TOLERANCE:g}) on the probe; not written")
        files = {"model": ONNX_NAME, **({"weights": EXTERNAL_DATA_NAME} if (staging / EXTERNAL_DATA_NAME).is_file()
                                        else {})}
        int8 = None
        if quantize == "int8":
            quantize_int8(onnx_path, staging / INT8_NAME)
            files["int8"] = INT8_NAME
            int8 = parity(detector, staging / INT8_NAME)
            for written in staging.iterdir():  # the quantiser writes its weights file 0600
                written.chmod(0o644)
        document = {**identity, "onnx": {
            "exported_from": exported_from, "files": files,
            "inputs": {"waveforms": "float32 [batch, samples], raw 16 kHz mono audio, zero-padded",
                       "lengths": "int64 [batch], valid samples per row"},
            "outputs": {OUTPUT_NAME: "float32 [batch, 2], [fake, real]",
                        EMBEDDING_NAME: f"float32 [batch, {detector.ssl_config.hidden_size}], the pooled embedding "
                                        f"the head takes (mean of the encoder's last layer over valid frames)"},
            "opset": OPSET, "exporter": EXPORTER,
            "torch": torch.__version__, "onnx": onnx.__version__, "sample_rate_hz": SAMPLE_RATE_HZ,
            "normalisation_in_graph": True, "parity_fp32": checked, "parity_int8": int8}}
        (staging / IDENTITY_NAME).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        (staging / LABELS_NAME).write_text(json.dumps(labels_document(identity), indent=2) + "\n", encoding="utf-8")
        if identity.get("calibration"):
            (staging / CALIBRATION_NAME).write_text(json.dumps(identity["calibration"], indent=2, default=str) + "\n",
                                                    encoding="utf-8")
        (staging / "README.md").write_text(render_onnx_card(document), encoding="utf-8")

    return write_export_folder(out_dir, EXPORT_KIND, write, overwrite=overwrite)

