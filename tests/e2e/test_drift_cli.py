"""``posttrain drift`` run as a user would, on speech-like audio written here and a tiny random-init
detector: a held-out split of the reference stays below the permutation null's 95th percentile, while the
same clips with white noise at 30, 20 and 10 dB SNR and through an 8 kHz G.711 round trip drift above it,
rising with the noise; saved embeddings are reused; bad inputs are refused in one line naming the option.

The detector is ``tiny_group_norm`` (seed 0): wav2vec 2.0 base's feature encoder, whose first layer
normalises each channel over time. Measured on model seeds 0-2 with these clips, 30 dB noise puts the
sliced W1 at 3.3-3.8 x the null's 95th percentile there, but at only 0.9-1.4 x with the layer-norm
``tiny`` preset, whose embeddings barely move under noise that faint: no margin for a test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import butter, resample_poly, sosfilt

from posttrain.cli import main

RATE = 16000
REFERENCE_CLIPS, HELD_OUT_CLIPS, CLIP_SECONDS = 300, 150, 1.0
FRICATIVE_BAND = butter(6, [3500, 7500], btype="bandpass", fs=RATE, output="sos")
SNRS_DB = (30, 20, 10)


def _syllable(rng: np.random.Generator, samples: int, kind: str) -> np.ndarray:
    """A voiced syllable (harmonics of a gliding f0 below 3.5 kHz shaped by two formants: deep valleys
    between and above them), a fricative (3.5-7.5 kHz noise) or a pause (silence), under a Hann envelope."""
    if kind == "pause":
        return np.zeros(samples)
    if kind == "fricative":
        wave = sosfilt(FRICATIVE_BAND, rng.standard_normal(samples))
    else:
        t = np.arange(samples) / RATE
        f0 = rng.uniform(90, 260) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        harmonics = np.arange(1, int(3500 // f0.max()) + 1)
        centres = harmonics * f0.mean()
        first, second = rng.uniform(300, 900), rng.uniform(900, 2500)
        gains = np.exp(-((centres - first) / 250) ** 2) + 0.5 * np.exp(-((centres - second) / 300) ** 2)
        wave = gains @ np.sin(np.outer(harmonics, 2 * np.pi * np.cumsum(f0) / RATE))
    return wave / np.sqrt(np.mean(wave**2)) * np.hanning(samples)


def speechlike(rng: np.random.Generator, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """Syllables of 80-250 ms (half voiced, a quarter fricatives, a quarter pauses), peak 0.3."""
    total, parts = int(seconds * RATE), [_syllable(rng, int(0.15 * RATE), "voiced")]
    while sum(map(len, parts)) < total:
        kind = rng.choice(["voiced", "voiced", "fricative", "pause"])
        parts.append(_syllable(rng, int(rng.uniform(0.08, 0.25) * RATE), kind))
    wave = np.concatenate(parts)[:total]
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def with_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(len(wave)) * np.sqrt(np.mean(wave.astype(np.float64) ** 2) / 10 ** (snr_db / 10))
    return np.clip(wave + noise, -1, 1).astype(np.float32)


def _write(folder: Path, waves: list[np.ndarray], rate_hz: int = RATE, subtype: str = "PCM_16") -> Path:
    folder.mkdir(parents=True)
    for i, wave in enumerate(waves):
        sf.write(folder / f"clip_{i:04d}.wav", wave, rate_hz, subtype=subtype)
    return folder


@pytest.fixture(scope="module")
def group_norm_model(tmp_path_factory) -> Path:
    """A random-init ``tiny_group_norm`` detector (seed 0) as a transformers export folder."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.hub.export import export_detector, identity_document
    from posttrain.models.detector import build_detector

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset="tiny_group_norm"))
    out = tmp_path_factory.mktemp("group_norm_export") / "model"
    return export_detector(detector, out, identity_document(detector, preset="tiny_group_norm"), "# test model\n")


@pytest.fixture(scope="module")
def conditions(tmp_path_factory) -> dict[str, Path]:
    """Audio folders: the reference, a held-out split of the same generator, and that split degraded."""
    root = tmp_path_factory.mktemp("drift_audio")
    rng = np.random.default_rng(1)
    reference = [speechlike(rng) for _ in range(REFERENCE_CLIPS)]
    held_out = [speechlike(rng) for _ in range(HELD_OUT_CLIPS)]
    noise = np.random.default_rng(5)
    folders = {"reference": _write(root / "reference", reference), "held_out": _write(root / "held_out", held_out)}
    for snr in SNRS_DB:
        folders[f"snr_{snr}db"] = _write(root / f"snr_{snr}db", [with_noise(w, snr, noise) for w in held_out])
    # G.711: down to 8 kHz and 8-bit mu-law on disk; posttrain decodes and resamples it back to 16 kHz
    folders["g711"] = _write(root / "g711", [resample_poly(w, 1, 2) for w in held_out], 8000, "ULAW")
    return folders


def _drift(*args: str) -> dict:
    assert main(["drift", *args, "--no-progress"]) == 0
    out = Path(args[args.index("--out") + 1])
    assert (out / "drift.png").stat().st_size > 10_000
    return json.loads((out / "drift.json").read_text())


def test_noise_and_codec_drift_above_the_null_and_rise_with_the_noise(conditions, group_norm_model, tmp_path, capsys):
    model = ["--model", str(group_norm_model)]
    held = _drift("--reference", str(conditions["reference"]), "--incoming", str(conditions["held_out"]), *model,
                  "--out", str(tmp_path / "held_out"))
    printed = capsys.readouterr().out
    assert "reference: embedded 300 of 300" in printed and "incoming: embedded 150 of 150" in printed
    assert "sliced_w1" in printed and "threshold" in printed
    saved = tmp_path / "held_out" / "reference"  # the embeddings just computed, reused from here on
    documents = {"held_out": held}
    for name in ("snr_30db", "snr_20db", "snr_10db", "g711"):
        documents[name] = _drift("--reference", str(saved), "--incoming", str(conditions[name]), *model,
                                 "--out", str(tmp_path / name))
        assert documents[name]["sources"]["reference"]["kind"] == "embeddings"
    assert "reference: embedded" not in capsys.readouterr().out
    table = {name: doc["distances"] for name, doc in documents.items()}
    print({name: {d: (round(r["value"], 4), round(r["threshold"], 4)) for d, r in rows.items()}
           for name, rows in table.items()})
    for distance in ("sliced_w1", "sliced_ks", "gaussian_kl"):
        assert table["held_out"][distance]["verdict"] == "no drift" and table["held_out"][distance]["p_value"] > 0.05
        values = [table[f"snr_{snr}db"][distance]["value"] for snr in SNRS_DB]
        assert table["held_out"][distance]["value"] < values[0] < values[1] < values[2], (distance, values)
        for name in ("snr_30db", "snr_20db", "snr_10db", "g711"):
            assert table[name][distance]["verdict"] == "drift", (distance, name, table[name][distance]["value"])


def test_bad_inputs_are_refused_in_one_line_naming_the_input(tmp_path, capsys, tiny_export_dir):
    audio = _write(tmp_path / "audio", [speechlike(np.random.default_rng(0)) for _ in range(3)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "embeddings.json").write_text("{}")
    cases = {
        ("--reference", str(tmp_path / "absent"), "--incoming", str(audio)): "--reference " + str(tmp_path / "absent"),
        ("--reference", str(audio), "--incoming", str(tmp_path / "empty")): "--incoming " + str(tmp_path / "empty"),
        ("--reference", str(audio), "--incoming", str(tmp_path / "broken")): "--incoming " + str(tmp_path / "broken"),
        ("--reference", str(audio), "--incoming", str(audio)): "--model is needed to embed --reference",
        ("--reference", str(audio), "--incoming", str(audio), "--model", str(tiny_export_dir),
         "--permutations", "0"): "drift.permutations",
    }
    for args, named in cases.items():
        assert main(["drift", *args, "--out", str(tmp_path / "out")]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("posttrain drift: error: ") and named in errors[0], errors
    assert not (tmp_path / "out").exists()
