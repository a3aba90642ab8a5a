"""The card (``README.md``) of an ONNX export: what the graph takes and returns, how close it is to the torch
model, and a snippet that scores a file as ``posttrain score`` does with onnxruntime, numpy, soundfile and
soxr only (``SNIPPET``; tests/hub/test_onnx_export.py runs it where torch cannot be imported).

The snippet follows the package's rules: decode with soundfile, mean of the channels, resample to 16 kHz with
the project's resampler (``posttrain.data.resample``: torchaudio's windowed sinc, ported to numpy here, for the
rates up to 48 kHz with a small kernel; soxr "HQ" for the others), ``posttrain score``'s default windows
(``posttrain.eval.scoring.WindowConfig``), window logits averaged by length, the model's score definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posttrain.eval.int8_check import PEARSON_GOAL, cpu_text, eer_text, r_text
from posttrain.eval.scoring import WindowConfig

SNIPPET_TEMPLATE = '''\
"""Score audio files with this ONNX model: python score_onnx.py MODEL_DIR FILE [FILE ...]"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf
import soxr

RATE = 16000
WINDOW_S, HOP_S, MIN_TAIL_S = {window_s}, {hop_s}, {min_tail_s}  # `posttrain score`'s default windows


def sinc_resample(x, orig, new):
    """torchaudio.functional.resample (Hann-windowed sinc, 6 zero crossings, rolloff 0.99) in numpy."""
    gcd = math.gcd(orig, new)
    orig, new = orig // gcd, new // gcd
    base = min(orig, new) * 0.99
    width = math.ceil(6 * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float32)[None, :] / orig
    t = (np.arange(0, -new, -1, dtype=np.float32)[:, None] / new + idx) * np.float32(base)
    t = np.clip(t, -6, 6)
    window = np.cos(t * np.float32(math.pi) / 6 / 2) ** 2
    t = t * np.float32(math.pi)
    safe = np.where(t == 0, np.float32(1), t)
    kernel = np.where(t == 0, np.float32(1), np.sin(safe) / safe) * (window * np.float32(base / orig))
    signal = np.pad(x, (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(signal, kernel.shape[1])[::orig]
    return (frames @ kernel.T).reshape(-1)[:math.ceil(new * len(x) / orig)].astype(np.float32)


def resample(x, rate):
    """The project's resampler rules (docs/parity.md, resampling): sinc up to 48 kHz, soxr HQ elsewhere."""
    if rate == RATE:
        return x
    gcd = math.gcd(rate, RATE)
    orig, new = rate // gcd, RATE // gcd
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    if rate <= 48000 and new <= 1000 and new * (2 * width + orig) <= 1 << 20:
        return sinc_resample(x, orig, new)
    return soxr.resample(x, rate, RATE, quality="HQ").astype(np.float32)


def spans(n):
    """[start, stop) windows; a tail shorter than MIN_TAIL_S joins the window before it."""
    window, hop, tail = round(WINDOW_S * RATE), round(HOP_S * RATE), round(MIN_TAIL_S * RATE)
    if window == 0:
        return [(0, n)]
    out = []
    for start in range(0, max(n, 1), hop):
        stop = min(start + window, n)
        if out and stop - start < tail:
            out[-1] = (out[-1][0], n)
        else:
            out.append((start, stop))
        if stop == n:
            break
    return out


def score_file(session, labels, calibration, path):
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = resample(wave.mean(axis=1, dtype=np.float32), rate)
    windows = spans(len(wave))
    logits = np.stack([session.run(["logits"], {{"waveforms": wave[None, a:b], "lengths": np.array([b - a])}})[0][0]
                       for a, b in windows]).astype(np.float64)
    weights = np.array([b - a for a, b in windows], dtype=np.float64)
    fake, real = (weights / weights.sum()) @ logits  # length-weighted mean of the window logits
    definition = labels["score_definition"]
    score = real - fake if definition == "logit_diff" else real  # "cosine": the one-class head's column 1
    row = {{"file": path, definition: float(score), "logit_fake": float(fake), "logit_real": float(real),
           "p_real": 1 / (1 + math.exp(-score)) if definition == "logit_diff" else None, "llr": None,
           "windows": len(windows)}}
    if calibration:  # LLR = slope x score + offset; a cosine's P(real) is the calibrated posterior
        row["llr"] = calibration["slope"] * score + calibration["offset"]
        if definition != "logit_diff":
            prior = calibration["prior_bona_fide"]
            row["p_real"] = 1 / (1 + math.exp(-(row["llr"] + math.log(prior / (1 - prior)))))
    return row


model = Path(sys.argv[1])
session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
labels = json.loads((model / "labels.json").read_text())
calibration = json.loads((model / "calibration.json").read_text()) if (model / "calibration.json").exists() else None
for path in sys.argv[2:]:
    print(json.dumps(score_file(session, labels, calibration, path)))
'''


def snippet(window: WindowConfig = WindowConfig()) -> str:
    """The scoring snippet with ``window``'s settings (default: ``posttrain score``'s)."""
    return SNIPPET_TEMPLATE.format(window_s=window.window_seconds, hop_s=window.hop_seconds,
                                   min_tail_s=window.min_tail_seconds)


def render_onnx_card(document: Mapping[str, Any]) -> str:
    """The card of an ONNX export from its ``posttrain.json`` (``document``, with its ``onnx`` section)."""
    onnx = document["onnx"]
    source = document.get("source") or {}
    fp32 = onnx["parity_fp32"]
    lines = [f"# {document.get('preset') or document.get('architecture')} deepfake detector (ONNX)", "",
             "A speech deepfake detector exported from posttrain to ONNX: raw 16 kHz audio in, two logits "
             "(and the pooled embedding) out, with the model's own input normalisation inside the graph. Runs "
             "with onnxruntime alone.", "",
             "## Inputs and outputs", "",
             "| name | type | meaning |", "|---|---|---|",
             "| `waveforms` | float32 [batch, samples] | raw 16 kHz mono audio in [-1, 1], zero-padded; any batch "
             "and length |",
             "| `lengths` | int64 [batch] | valid samples of each row (the padding mask is derived from it) |",
             "| `logits` | float32 [batch, 2] | [fake, real] (`labels.json`) |",
             f"| `embedding` | float32 [batch, {document['ssl_config']['hidden_size']}] | "
             "the pooled embedding the head takes (drift monitoring: `posttrain serve --drift-reference`) |", "",
             f"Score of record: `{document.get('score_definition')}` (higher = bona fide). Per-utterance "
             f"normalisation `(x - mean) / sqrt(var + {document.get('input_normalisation', {}).get('eps')})` "
             "over the valid samples is part of the graph: feed raw audio.", "",
             "## Scoring a file (onnxruntime, numpy, soundfile, soxr; no torch)", "",
             "`posttrain score`'s defaults: files longer than the window are cut into windows, each scored "
             "alone, window logits averaged by length. Saved as `score_onnx.py`, run "
             "`python score_onnx.py MODEL_DIR FILE...`:", "",
             "```python", snippet().rstrip("\n"), "```", "",
             "With posttrain: `posttrain score --backend onnxruntime --model MODEL_DIR FILE...` (and "
             "`posttrain eval --backend onnxruntime`).", "",
             "## Parity with the torch model", "",
             f"Max |logit difference| onnxruntime vs torch on a 1 s voiced-speech probe ({onnx['exporter']}, "
             f"opset {onnx['opset']}):", "",
             "| peak level (dBFS) | batch 1 | padded batch |", "|---|---|---|"]
    for index, level in enumerate(fp32["levels_dbfs"]):
        lines.append(f"| {level:g} | {fp32['max_abs_logit_diff']['batch_1'][index]:.2e} | "
                     f"{fp32['max_abs_logit_diff']['padded_batch'][index]:.2e} |")
    int8 = onnx.get("parity_int8")
    if int8:
        worst = max(max(values) for values in int8["max_abs_logit_diff"].values())
        lines += ["", f"`model.int8.onnx` (dynamic int8 weights): up to {worst:.3g} from the torch logits on the "
                      "same probe; use it where that is acceptable."]
    if onnx.get("int8_check"):
        lines += ["", *int8_check_lines(onnx["int8_check"])]
    calibration = document.get("calibration")
    logits = document.get("score_definition") in (None, "logit_diff")
    if calibration:
        text = ("`calibration.json`: LLR = slope x score + offset, reported by the snippet and `posttrain score`"
                + ("; P(real) stays the softmax of the logits." if logits else "; P(real) is its posterior."))
    else:
        text = ("None stored: P(real) is the uncalibrated softmax of the logits." if logits else
                "None stored: a cosine is no probability, so there is no P(real) until a calibration is fitted.")
    lines += ["", "## Calibration", "", text]
    lines += ["", "## Provenance", "", f"Exported from `{onnx.get('exported_from') or source.get('path') or '-'}` "
              f"(source: {source.get('kind', '-')}); licence: {document.get('license') or 'see the source model'}; "
              "`posttrain.json` holds the full identity.", ""]
    return "\n".join(lines)


def int8_check_lines(check: Mapping[str, Any]) -> list[str]:
    """The card's section on the int8 model's quality on labelled sets (``posttrain.eval.int8_check``)."""
    bootstrap = check["bootstrap"]
    lines = ["## int8 quality on labelled sets", "",
             f"Every trial scored with `model.onnx` (fp32) and `model.int8.onnx` ({check['scoring']}): each "
             f"model's EER with its 95 % percentile bootstrap CI ({bootstrap['resamples']} resamples, seed "
             f"{bootstrap['seed']}) and the Pearson r of the two score lists. Goals: the int8 EER inside fp32's "
             f"CI, r >= {PEARSON_GOAL}. int8 results depend on the CPU's instruction set; measured on "
             f"{cpu_text(check['cpu'])} (onnxruntime {check['onnxruntime']}).", "",
             "| set | data | trials | fp32 EER [95 % CI] | int8 EER [95 % CI] | Pearson r | int8 EER in fp32 CI "
             f"| r >= {PEARSON_GOAL} |", "|---|---|---:|---|---|---:|---|---|"]
    for row in check["sets"]:
        data = row["data"] if row["root"] is None else f"{row['data']} (root {row['root']})"
        lines.append(f"| {row['name']} | `{data}` | {row['trials']} | {eer_text(row['fp32'])} | "
                     f"{eer_text(row['int8'])} | {r_text(row['pearson_r'])} | "
                     f"{'yes' if row['int8_eer_in_fp32_ci'] else 'no'} | "
                     f"{'yes' if row['pearson_meets_goal'] else 'no'} |")
    return lines
