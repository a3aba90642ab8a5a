"""`POST /v1/score` options: a region of the upload (``start_seconds``/``end_seconds``) and the window
(``window_seconds``), as query or form fields, against a running server (the conftest ``server``: 2 s
windows, 1 s hop, 1 s tail, 16 s passes). A region scores exactly like the slice uploaded alone; a
window like the engine's own windows of that length; bad values are 422 naming the field; no option
answers as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import soundfile as sf
import torch

from posttrain.eval.inference import forward_windows
from posttrain.eval.scoring import WindowConfig, aggregate, logit_diff
from posttrain.serve.config import ServeConfig
from posttrain.serve.options import ScoreOptions

RATE = 16000
TODAYS_KEYS = {"file", "seconds", "windows", "score_definition", "logit_diff", "p_real", "llr",
               "probability_real_calibrated", "decision", "level_dbfs", "timeline", "warnings"}


def _pcm(seconds: float, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.2 * (np.sin(2 * np.pi * 190 * t) * (1 + 0.5 * np.sin(0.7 * t)) + 0.25 * rng.standard_normal(t.size))
    return np.round(wave * 32767).astype(np.int16)


def _wav(pcm: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, pcm, RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _post(server, data: bytes, params=None, **kwargs):
    return requests.post(f"{server.url}/v1/score", data=data, params=params, timeout=60,
                         headers=server.headers(**{"Content-Type": "audio/wav", "X-Filename": "clip.wav"}), **kwargs)


def _ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _refused(response, field: str) -> str:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_option" and body["detail"].startswith(field) and "\n" not in body["detail"], body
    return body["detail"]


def _scores(result: dict) -> list[float]:
    return [window["logit_diff"] for window in result["timeline"]["windows"]]


@pytest.mark.slow
def test_a_region_scores_like_that_slice_uploaded_alone(server):
    pcm = _pcm(6.5)
    start, end = 1.25, 4.75
    region = _ok(_post(server, _wav(pcm), {"start_seconds": start, "end_seconds": end}))
    alone = _ok(_post(server, _wav(pcm[int(start * RATE):int(end * RATE)])))
    assert region["region"] == {"start_seconds": start, "end_seconds": end}
    assert region["window"] == {"window_seconds": 2.0, "hop_seconds": 1.0}
    assert region["seconds"] == alone["seconds"] == end - start and region["windows"] == alone["windows"] == 3
    assert region["logit_diff"] == pytest.approx(alone["logit_diff"], abs=1e-6)
    assert region["p_real"] == pytest.approx(alone["p_real"], abs=1e-6) and region["decision"] == alone["decision"]
    assert region["level_dbfs"] == pytest.approx(alone["level_dbfs"], abs=1e-9)
    assert _scores(region) == pytest.approx(_scores(alone), abs=1e-6)
    # the timeline is in the uploaded file's time
    assert [(w["start_s"], w["end_s"]) for w in region["timeline"]["windows"]] == \
        [(w["start_s"] + start, w["end_s"] + start) for w in alone["timeline"]["windows"]]
    assert region["timeline"]["seconds"] == end == region["timeline"]["windows"][-1]["end_s"]  # the axis holds them
    # the same options as multipart form fields; an end past the file's end is cut to it
    form = _ok(requests.post(f"{server.url}/v1/score", files={"file": ("c.wav", _wav(pcm), "audio/wav")},
                             data={"start_seconds": str(start), "end_seconds": str(end)}, headers=server.headers(),
                             timeout=60))
    assert form["logit_diff"] == region["logit_diff"] and form["region"] == region["region"]
    tail = _ok(_post(server, _wav(pcm), {"start_seconds": 3.5, "end_seconds": 100}))
    assert tail["region"] == {"start_seconds": 3.5, "end_seconds": 6.5}
    assert tail["logit_diff"] == pytest.approx(_ok(_post(server, _wav(pcm[int(3.5 * RATE):])))["logit_diff"], abs=1e-6)


@pytest.mark.slow
def test_a_window_scores_like_the_engines_windows_of_that_length(server, tiny_export_dir):
    from posttrain.loading import load_model

    pcm = _pcm(7.3, seed=4)
    result = _ok(_post(server, _wav(pcm), {"window_seconds": 3}))
    assert result["window"] == {"window_seconds": 3.0, "hop_seconds": 1.5}  # the service's overlap: hop = window / 2
    assert result["region"] == {"start_seconds": 0.0, "end_seconds": len(pcm) / RATE}
    samples = pcm.astype(np.float32) / 32768
    spans = WindowConfig(3.0, 1.5, 1.0).spans(len(samples))
    assert [(w["start_s"], w["end_s"]) for w in result["timeline"]["windows"]] == [(a / RATE, b / RATE) for a, b in spans]
    logits, _ = forward_windows(load_model(tiny_export_dir)[0], [samples[a:b] for a, b in spans], torch.device("cpu"))
    logits = logits.astype(np.float64)
    assert _scores(result) == pytest.approx(logit_diff(logits).tolist(), abs=1e-5)
    file_logits, _ = aggregate(np.array([b - a for a, b in spans]), logits, None)
    assert result["logit_diff"] == pytest.approx(float(logit_diff(file_logits)), abs=1e-5)


@pytest.mark.slow
def test_no_option_answers_as_before(server):
    data = _wav(_pcm(5.5, seed=1))
    plain = _ok(_post(server, data))
    assert set(plain) == TODAYS_KEYS  # no region / window: the answer of a request without options is unchanged
    explicit = _ok(_post(server, data, {"start_seconds": 0, "window_seconds": 2}))
    assert {key: explicit[key] for key in TODAYS_KEYS} == plain
    model = requests.get(f"{server.url}/v1/model", headers=server.headers(), timeout=30).json()
    assert model["request_window_bounds_seconds"] == [1.0, 15.0]
    schema = requests.get(f"{server.url}/openapi.json", headers=server.headers(), timeout=30).json()
    assert [p["name"] for p in schema["paths"]["/v1/score"]["post"]["parameters"]] == \
        ["start_seconds", "end_seconds", "window_seconds"]


@pytest.mark.slow
def test_bad_options_get_422_naming_the_field_and_the_service_stays_up(server):
    data = _wav(_pcm(3.0))
    assert "got -1" in _refused(_post(server, data, {"start_seconds": -1}), "start_seconds")
    assert "duration 3.000 s" in _refused(_post(server, data, {"start_seconds": 3.0}), "start_seconds")
    _refused(_post(server, data, {"start_seconds": 2, "end_seconds": 2}), "end_seconds")
    _refused(_post(server, data, {"end_seconds": 0}), "end_seconds")
    for window in (0.5, 15.5, "nan", "inf", "3s"):
        detail = _refused(_post(server, data, {"window_seconds": window}), "window_seconds")
        assert "1..15" in detail or "number" in detail, detail
    form = requests.post(f"{server.url}/v1/score?start_seconds=1", files={"file": ("c.wav", data, "audio/wav")},
                         data={"start_seconds": "1"}, headers=server.headers(), timeout=60)
    assert "twice" in _refused(form, "start_seconds")
    _refused(requests.post(f"{server.url}/v1/score", files={"file": ("c.wav", data, "audio/wav")},
                           data={"window_seconds": "20"}, headers=server.headers(), timeout=60), "window_seconds")
    assert _ok(_post(server, data))["windows"] == 2
    (service,) = server.temp_dir.iterdir()  # the service's own folder: no upload of a refused request left
    assert [path.name for path in service.rglob("*")] == [".lock"]


def test_options_parse_and_check_without_audio():
    options = ScoreOptions.parse([("start_seconds", "1.5"), ("other", "x")], [("end_seconds", "3")])
    assert options == ScoreOptions(1.5, 3.0, None) and options.given and not ScoreOptions().given
    assert options.region(10 * RATE) == (24000, 48000)
    assert ScoreOptions(end_seconds=99).region(RATE) == (0, RATE)
    assert ScoreOptions(window_seconds=3).window(WindowConfig(4, 2, 1)) == WindowConfig(3, 1.5, 1)
    assert ScoreOptions().window(WindowConfig(4, 2, 1)) == WindowConfig(4, 2, 1)
    with pytest.raises(Exception, match=r"^window_seconds must be within this service's bounds 1..15 s, got 0.5$"):
        ScoreOptions(window_seconds=0.5).check_window((1.0, 15.0))
    with pytest.raises(Exception, match=r"^start_seconds must be >= 0 and < the file's duration 12.300 s, got 12.3$"):
        ScoreOptions(start_seconds=12.3).region(int(12.3 * RATE))


def test_config_bounds_the_request_window():
    assert ServeConfig(model="m").request_window_bounds() == (1.0, 15.0)
    assert ServeConfig(model="m", min_tail_seconds=1.5, min_window_seconds=0.5).request_window_bounds() == (1.5, 14.5)
    assert ServeConfig(model="m", max_window_seconds=8).request_window_bounds() == (1.0, 8.0)
    with pytest.raises(ValueError, match="^serve.max_window_seconds: "):
        ServeConfig(model="m", max_window_seconds=15.5)
    with pytest.raises(ValueError, match="^serve.max_window_seconds: "):
        ServeConfig(model="m", min_window_seconds=3, max_window_seconds=2)
    with pytest.raises(ValueError, match="^serve.min_window_seconds: "):
        ServeConfig(model="m", min_window_seconds=0)
