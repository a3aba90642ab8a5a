"""`posttrain serve --drift-reference`: the drift of recent requests, from the scoring pass's own
embeddings, in ``/metrics`` and ``/v1/drift``: low while requests look like the reference, above the
threshold once noisy requests fill the window; the value is the one `posttrain embed`'s embeddings of
the same files give (one forward pass, one embedding path)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import requests
import soundfile as sf
from conftest import start_server, stop_server

from posttrain.select.drift import SlicedReference
from posttrain.select.embeddings import load_embeddings
from posttrain.serve.drift import PROJECTIONS, SEED

pytestmark = pytest.mark.slow

RATE, WINDOW_FILES = 16000, 8


def _clip(seed: int, snr_db: float | None = None) -> np.ndarray:
    """1.5 s of a gliding tone with harmonics (the reference's kind of audio), optionally in white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.5 * RATE)) / RATE
    f0 = rng.uniform(120, 220) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    wave = 0.2 * wave / np.abs(wave).max()
    if snr_db is not None:
        wave = wave + rng.standard_normal(t.size) * np.sqrt(np.mean(wave**2) / 10 ** (snr_db / 10))
    return wave.astype(np.float32)


def _wav(wave: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, wave, RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _embed(model_dir, folder, out):
    """``posttrain embed``'s embeddings of the clips in ``folder``, each scored whole as the service scores a
    1.5 s file (its 4 s windows)."""
    from posttrain.eval.inference import FileSource
    from posttrain.eval.scoring import InferenceConfig, WindowConfig
    from posttrain.loading import load_model
    from posttrain.select.embed import embed_source
    from posttrain.select.embeddings import load_embeddings

    model, identity = load_model(model_dir)
    cfg = InferenceConfig(window=WindowConfig(4.0, 2.0, 1.0), progress=False)
    embed_source(model, FileSource([folder]), out, cfg, model_identity=identity)
    return load_embeddings(out)[0]


def _write(folder, waves):
    folder.mkdir()
    for i, wave in enumerate(waves):
        sf.write(folder / f"clip_{i:02d}.wav", wave, RATE, subtype="PCM_16")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_export_dir, tmp_path_factory):
    """Embeddings of 40 clean clips by the served model."""
    work = tmp_path_factory.mktemp("drift_reference")
    _embed(tiny_export_dir, _write(work / "audio", [_clip(100 + i) for i in range(40)]), work / "embeddings")
    return work / "embeddings"


def _drift(server, files_seen: int) -> dict:
    """``/v1/drift`` once the value covers every file sent (a read starts a computation that is due)."""
    deadline = time.monotonic() + 30
    while True:
        status = requests.get(f"{server.url}/v1/drift", headers=server.headers(), timeout=30).json()
        if status["computed_at_files"] == files_seen or time.monotonic() > deadline:
            assert status["files_seen"] == files_seen, status
            return status
        time.sleep(0.05)


def _gauges(server) -> dict[str, str]:
    text = requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=30).text
    return {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("posttrain_serve_drift")}


def _send(server, waves: list[np.ndarray]) -> list[dict]:
    results = []
    for wave in waves:
        response = requests.post(f"{server.url}/v1/score", data=_wav(wave), timeout=60,
                                 headers=server.headers(**{"Content-Type": "audio/wav"}))
        assert response.status_code == 200, response.text
        results.append(response.json())
    return results


def test_the_drift_gauge_moves_when_noisy_requests_arrive(tiny_export_dir, reference, tmp_path):
    server = start_server(tiny_export_dir, tmp_path, "--drift-reference", str(reference), "--drift-window",
                          str(WINDOW_FILES), "--drift-every-files", "1")
    try:
        assert set(_gauges(server)) == {"posttrain_serve_drift_sliced_w1", "posttrain_serve_drift_threshold",
                                        "posttrain_serve_drift_window_files"}
        assert _gauges(server)["posttrain_serve_drift_sliced_w1"] == "NaN"  # no request yet
        clean_waves = [_clip(500 + i) for i in range(WINDOW_FILES)]
        clean = _send(server, clean_waves)
        calm = _drift(server, WINDOW_FILES)
        assert calm["window_files"] == WINDOW_FILES and calm["threshold"] > 0
        assert calm["drift"] is False, calm
        # the served embeddings are `posttrain embed`'s for the same files: the value is the same number
        offline = _embed(tiny_export_dir, _write(tmp_path / "clean", clean_waves), tmp_path / "clean_embeddings")
        served = SlicedReference(np.asarray(load_embeddings(reference)[0], np.float64), PROJECTIONS, SEED)
        assert calm["value"] == pytest.approx(served.w1(offline), rel=1e-4)
        _send(server, [_clip(600 + i, snr_db=0.0) for i in range(WINDOW_FILES)])
        stormy = _drift(server, 2 * WINDOW_FILES)
        assert stormy["drift"] is True and stormy["value"] > stormy["threshold"] > calm["value"], (calm, stormy)
        gauges = _gauges(server)
        assert float(gauges["posttrain_serve_drift_sliced_w1"]) == pytest.approx(stormy["value"], rel=1e-6)
        assert float(gauges["posttrain_serve_drift_threshold"]) == pytest.approx(stormy["threshold"], rel=1e-6)
        # the embedding rides along: a clip still scores what it scored in the calm phase
        assert _send(server, [clean_waves[0]])[0]["logit_diff"] == pytest.approx(clean[0]["logit_diff"], abs=1e-6)
    finally:
        log = stop_server(server)
    assert "Application shutdown complete" in log
