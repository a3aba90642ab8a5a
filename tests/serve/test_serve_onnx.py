"""`posttrain serve --backend onnxruntime`: an ONNX export of the tiny model, served on the CPU, answers what the
torch service of the same model answers, and its drift monitor gets the graph's ``embedding`` output (the
value the torch service's monitor computes); the inference core embeds with an ONNX export as with the torch
model; an export made before the graph had that output still scores and serves, with drift monitoring off
(said once: in the log and at /v1/drift); an ONNX backend with a CUDA device is refused in one line."""

from __future__ import annotations

import io
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import soundfile as sf
from conftest import start_server, stop_server

from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.eval.inference import FileSource, Sample, iter_outputs
from posttrain.eval.onnx_runtime import EMBEDDING_NAME, OnnxModel
from posttrain.eval.scoring import InferenceConfig, WindowConfig
from posttrain.loading import load_model
from posttrain.select.embed import embed_source
from posttrain.select.embeddings import load_embeddings

pytestmark = pytest.mark.slow

RATE, WINDOW_FILES = 16000, 4
TOLERANCE = 1e-4  # onnxruntime fp32 vs torch, on scores and embeddings
SERVICE_WINDOWS = WindowConfig(4.0, 2.0, 1.0)  # the service's default windows


def _clip(seed: int, seconds: float = 1.5) -> np.ndarray:
    """A gliding tone with harmonics and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = rng.uniform(120, 220) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    wave = sum(np.sin(k * 2 * np.pi * np.cumsum(f0) / RATE) / k for k in range(1, 6))
    wave = wave + 0.05 * rng.standard_normal(t.size)
    return (0.2 * wave / np.abs(wave).max()).astype(np.float32)


def _wav(wave: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, wave, RATE, format="WAV", subtype="FLOAT")  # float samples: what is sent is what is scored
    return out.getvalue()


@pytest.fixture(scope="module")
def onnx_dir(tiny_export_dir, tmp_path_factory):
    """``posttrain export --format onnx --quantize int8`` of the tiny export (no calibration, like it)."""
    out = tmp_path_factory.mktemp("serve_onnx") / "tiny_onnx"
    assert main(["export", str(tiny_export_dir), "--format", "onnx", "--out", str(out), "--quantize", "int8"]) == 0
    return out


@pytest.fixture(scope="module")
def old_onnx_dir(onnx_dir, tmp_path_factory):
    """That export as posttrain wrote it before its graphs had an ``embedding`` output (removed from both)."""
    import onnx

    out = tmp_path_factory.mktemp("old_onnx") / "tiny_onnx"
    shutil.copytree(onnx_dir, out)
    for name in ("model.onnx", "model.int8.onnx"):
        model = onnx.load(str(out / name))
        kept = [output for output in model.graph.output if output.name != EMBEDDING_NAME]
        assert len(kept) == len(model.graph.output) - 1
        del model.graph.output[:]
        model.graph.output.extend(kept)
        onnx.save_model(model, str(out / name))
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Files of the drift reference and the served requests: 12 reference clips; requests of a 9.5 s file (four
    windows, the long lane) and three 1.5 s clips (the short lane)."""
    folder = tmp_path_factory.mktemp("onnx_clips")
    (folder / "reference").mkdir()
    for index in range(12):
        sf.write(folder / "reference" / f"clip_{index:02d}.wav", _clip(100 + index), RATE, subtype="FLOAT")
    return folder / "reference", [_clip(7, 9.5), *(_clip(500 + index) for index in range(WINDOW_FILES - 1))]


@pytest.fixture(scope="module")
def reference(onnx_dir, clips, tmp_path_factory):
    """The drift reference, embedded with the ONNX export (the inference core's ``embeddings=True`` path)."""
    out = tmp_path_factory.mktemp("onnx_reference") / "embeddings"
    model = OnnxModel(onnx_dir)
    embed_source(model, FileSource([clips[0]]), out, InferenceConfig(window=SERVICE_WINDOWS, progress=False),
                 model_identity=model.identity)
    return out


def test_an_onnx_export_embeds_like_the_torch_model_and_an_old_one_says_it_cannot(
        tiny_export_dir, onnx_dir, old_onnx_dir, clips, reference, tmp_path):
    torch_model, identity = load_model(tiny_export_dir)
    embed_source(torch_model, FileSource([clips[0]]), tmp_path / "torch", InferenceConfig(window=SERVICE_WINDOWS,
                 progress=False), model_identity=identity)
    (ours, ours_meta), (theirs, theirs_meta) = load_embeddings(reference), load_embeddings(tmp_path / "torch")
    assert ours.shape == theirs.shape == (12, identity["ssl_config"]["hidden_size"])
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert [row["id"] for row in ours_meta] == [row["id"] for row in theirs_meta]
    # an export without the output scores as before; asked for embeddings, it says why not and the fix
    old, cfg = OnnxModel(old_onnx_dir), InferenceConfig(window=SERVICE_WINDOWS, progress=False)
    assert not old.has_embedding and OnnxModel(onnx_dir).has_embedding
    sample = Sample(0, "long", clips[1][0], {})
    (scored,) = iter_outputs(old, [sample], cfg)
    (expected,) = iter_outputs(OnnxModel(onnx_dir), [sample], cfg, embeddings=True)
    assert scored.embedding is None and expected.embedding is not None
    assert np.abs(scored.logits - expected.logits).max() < 1e-6
    with pytest.raises(UserError, match="no 'embedding' output .*`posttrain export --format onnx"):
        list(iter_outputs(old, [sample], cfg, embeddings=True))


@pytest.fixture(scope="module")
def services(tiny_export_dir, onnx_dir, old_onnx_dir, reference, tmp_path_factory):
    """The torch and the onnxruntime service of the tiny model, and the old export's on onnxruntime-int8, all with
    the drift reference (started at once: a start is mostly imports). Their logs come back at the end."""
    work = tmp_path_factory.mktemp("onnx_services")
    drift = ("--drift-reference", str(reference), "--drift-window", str(WINDOW_FILES), "--drift-every-files", "1")
    specs = {"torch": (tiny_export_dir,), "onnx": (onnx_dir, "--backend", "onnxruntime"),
             "old": (old_onnx_dir, "--backend", "onnxruntime-int8")}
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {name: pool.submit(start_server, spec[0], work / name, *spec[1:], *drift)
                   for name, spec in specs.items()}
    failed = [future.exception() for future in futures.values() if future.exception() is not None]
    running = {name: future.result() for name, future in futures.items() if future.exception() is None}
    if failed:
        for server in running.values():
            stop_server(server)
        raise failed[0]
    yield running
    logs = {name: stop_server(server) for name, server in running.items()}
    assert all("Application shutdown complete" in log for log in logs.values()), logs


def _score(server, wave: np.ndarray) -> dict:
    response = requests.post(f"{server.url}/v1/score", data=_wav(wave), timeout=60,
                             headers=server.headers(**{"Content-Type": "audio/wav"}))
    assert response.status_code == 200, response.text
    return response.json()


def _get(server, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", headers=server.headers(), timeout=30)


def _drift(server, files: int) -> dict:
    """``/v1/drift`` once its value covers ``files`` files (or the last answer after 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        status = _get(server, "/v1/drift").json()
        if status.get("computed_at_files") == files or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def _same(ours, theirs, where: str = "") -> None:
    """Equal structures, numbers within ``TOLERANCE``."""
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in theirs:
            _same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (one, other) in enumerate(zip(ours, theirs)):
            _same(one, other, f"{where}[{index}]")
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        assert abs(ours - theirs) < TOLERANCE, (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def test_the_onnx_service_answers_the_torch_services_scores_and_drift(services, clips):
    torch_server, onnx_server = services["torch"], services["onnx"]
    assert _get(onnx_server, "/v1/model").json()["model"]["backend"] == "onnxruntime"
    before = _drift(onnx_server, 0)
    assert before["enabled"] is True and before["files_seen"] == 0 and before["value"] is None
    for wave in clips[1]:
        ours, theirs = _score(onnx_server, wave), _score(torch_server, wave)
        assert theirs["windows"] == (4 if len(wave) > 4 * RATE else 1)
        _same(ours, theirs)
    ours, theirs = _drift(onnx_server, WINDOW_FILES), _drift(torch_server, WINDOW_FILES)
    assert ours["files_seen"] == theirs["files_seen"] == WINDOW_FILES, ours
    assert ours["window_files"] == WINDOW_FILES and ours["threshold"] == pytest.approx(theirs["threshold"])
    assert ours["value"] > 0 and ours["value"] == pytest.approx(theirs["value"], rel=TOLERANCE, abs=1e-6)
    (line,) = [line for line in _get(onnx_server, "/metrics").text.splitlines()
               if line.startswith("posttrain_serve_drift_sliced_w1 ")]
    assert float(line.split()[1]) == pytest.approx(ours["value"], rel=1e-6)


def test_an_export_without_the_embedding_output_serves_with_drift_off(services, onnx_dir, clips):
    server, fp32 = services["old"], OnnxModel(onnx_dir)
    for wave in clips[1][1:]:  # int8: close to the fp32 graph's scores, never compared exactly
        fake, real = fp32.logits([wave])[0]
        assert abs(_score(server, wave)["logit_diff"] - (real - fake)) < 0.1
    status = _get(server, "/v1/drift").json()
    assert status["enabled"] is False and "no 'embedding' output" in status["detail"], status
    assert "posttrain export --format onnx" in status["detail"]
    assert "posttrain_serve_drift" not in _get(server, "/metrics").text
    log = server.log.read_text()  # said once, at start
    assert log.count("drift monitoring is off") == 1 and "model.int8.onnx: no 'embedding' output" in log, log[-3000:]


def test_an_onnx_backend_on_cuda_is_refused_in_one_line(onnx_dir, capsys):
    from posttrain.serve.config import ServeConfig

    assert main(["serve", str(onnx_dir), "--backend", "onnxruntime", "--device", "cuda"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "serve.device: cuda: the onnxruntime backend runs on the CPU only" in line and "drop --device" in line
    assert main(["serve", str(onnx_dir), "--backend", "onnxruntime-int8", "--precision", "bf16"]) == 2
    assert "serve.precision: bf16" in capsys.readouterr().err
    ServeConfig(model="m", backend="onnxruntime", device="cpu")  # the CPU is accepted
    ServeConfig(model="m", device="cuda:0")  # and CUDA for the torch model
    with pytest.raises(ValueError, match="serve.backend: 'tensorrt'"):
        ServeConfig(model="m", backend="tensorrt")
