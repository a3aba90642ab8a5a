"""`posttrain serve` against a running server process: scores equal an independent reference, and
every bad input gets a 4xx (or 503) with a one-line reason while the service stays up and keeps no file."""

from __future__ import annotations

import functools
import io
import json
import socket
import subprocess
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import chromium_driver
import requests
import soundfile as sf
import torch

pytestmark = pytest.mark.slow

RATE = 16000


def _wav(seconds: float, *, seed: int = 0, level: float = 0.2, noise: float = 0.25, fmt: str = "WAV",
         subtype: str = "PCM_16") -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = level * (np.sin(2 * np.pi * 190 * t) * (1 + 0.5 * np.sin(0.7 * t)) + noise * rng.standard_normal(t.size))
    out = io.BytesIO()
    sf.write(out, wave.astype(np.float32), RATE, format=fmt, subtype=subtype)
    return out.getvalue()


@functools.lru_cache(maxsize=1)
def _model(model_dir):
    from posttrain.loading import load_model

    return load_model(model_dir)[0]


def _reference_scores(model_dir, data: bytes, window_s: float, hop_s: float) -> tuple[list[float], float]:
    """Window logit_diffs (each window alone, its own normalisation) and their length-weighted mean."""
    model = _model(model_dir)
    wave, _ = sf.read(io.BytesIO(data), dtype="float32")
    window, hop = int(window_s * RATE), int(hop_s * RATE)
    spans, start = [], 0
    while True:
        stop = min(start + window, len(wave))
        spans.append((start, stop))
        if stop == len(wave):
            break
        start += hop
    scores = []
    for a, b in spans:
        x = torch.from_numpy(wave[a:b].astype(np.float64))
        x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)).float()[None]
        with torch.no_grad():
            logits = model(x, torch.tensor([x.shape[1]])).double().numpy()[0]
        scores.append(float(logits[1] - logits[0]))
    lengths = np.array([b - a for a, b in spans], float)
    return scores, float(lengths @ np.array(scores) / lengths.sum())


def _post(server, data: bytes, content_type: str = "audio/wav", **kwargs):
    return requests.post(f"{server.url}/v1/score", data=data, timeout=60,
                         headers=server.headers(**{"Content-Type": content_type, "X-Filename": "clip.wav"}), **kwargs)


def _assert_refused(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == kind and body["detail"] and "\n" not in body["detail"], body
    return body


def test_scores_equal_an_independent_reference_with_timeline(server, tiny_export_dir):
    data = _wav(5.5, seed=1)
    response = _post(server, data)
    assert response.status_code == 200, response.text
    result = response.json()
    windows, file_score = _reference_scores(tiny_export_dir, data, 2.0, 1.0)
    assert result["logit_diff"] == pytest.approx(file_score, abs=1e-4)
    assert [w["logit_diff"] for w in result["timeline"]["windows"]] == pytest.approx(windows, abs=1e-4)
    assert result["p_real"] == pytest.approx(1 / (1 + np.exp(-file_score)), abs=1e-5)
    assert result["decision"] == ("real" if result["logit_diff"] >= 0 else "fake")  # uncalibrated rule
    assert result["probability_real_calibrated"] is None and result["file"] == "clip.wav"
    # the same bytes in a multipart form and as FLAC score the same (one decoding path)
    form = requests.post(f"{server.url}/v1/score", files={"file": ("c.wav", data, "audio/wav")},
                         headers=server.headers(), timeout=60).json()
    assert form["logit_diff"] == pytest.approx(result["logit_diff"], abs=1e-6)


def _metric(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_windows_of_concurrent_requests_share_forward_passes(server, tiny_export_dir):
    """8 simultaneous 5.5 s uploads (5 windows each): scored in fewer passes than requests, so windows
    of different requests were batched together; each still gets its own, correct-length result."""
    passes, windows = _metric(server, "posttrain_serve_forward_passes_total"), _metric(server, "posttrain_serve_windows_total")
    clips = [_wav(5.5, seed=10 + i) for i in range(8)]
    results: dict[int, dict] = {}

    def call(i: int) -> None:
        results[i] = _post(server, clips[i]).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[i]["windows"] == 5 for i in range(8)), results
    assert _metric(server, "posttrain_serve_windows_total") - windows == 40
    assert _metric(server, "posttrain_serve_forward_passes_total") - passes < 8
    for i, clip in enumerate(clips):  # each request got its own windows' result back
        assert results[i]["logit_diff"] == pytest.approx(_reference_scores(tiny_export_dir, clip, 2, 1)[1], abs=1e-4)


def test_batch_scores_each_file_and_reports_each_bad_one(server, tiny_export_dir):
    good, other = _wav(3.0, seed=2), _wav(2.5, seed=3)
    files = [("files", ("a.wav", good, "audio/wav")), ("files", ("junk.wav", b"not audio at all" * 50, "audio/wav")),
             ("files", ("b.flac", _wav(2.5, seed=3, fmt="FLAC"), "audio/flac"))]
    response = requests.post(f"{server.url}/v1/score/batch", files=files, headers=server.headers(), timeout=60)
    assert response.status_code == 200, response.text
    a, junk, b = response.json()["results"]
    assert a["ok"] and a["logit_diff"] == pytest.approx(_reference_scores(tiny_export_dir, good, 2, 1)[1], abs=1e-4)
    assert b["ok"] and b["logit_diff"] == pytest.approx(_reference_scores(tiny_export_dir, other, 2, 1)[1], abs=1e-3)
    assert not junk["ok"] and junk["status"] == 422 and junk["error"] == "unreadable" and junk["file"] == "junk.wav"


def test_compressed_formats_score_like_score_reads_them(server, tmp_path):
    """mp3 and m4a (ffmpeg's path, which needs a seekable copy: made in the service's own folder)."""
    (tmp_path / "c.wav").write_bytes(_wav(3.0, seed=5))
    for name, kind in (("c.mp3", "audio/mpeg"), ("c.m4a", "audio/mp4")):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(tmp_path / "c.wav"), str(tmp_path / name)], check=True)
        response = _post(server, (tmp_path / name).read_bytes(), kind)
        assert response.status_code == 200, response.text
        assert abs(response.json()["seconds"] - 3.0) < 0.1  # encoder padding only


def test_bad_inputs_get_a_one_line_4xx_and_the_service_stays_up(server):
    wav = _wav(3.0)
    _assert_refused(_post(server, b"\x00\x01garbage" * 400), 422, "unreadable")  # corrupt audio
    _assert_refused(_post(server, wav[: len(wav) // 2]), 422, "truncated")  # truncated WAV
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20
    _assert_refused(_post(server, png, "application/octet-stream"), 422, "unreadable")  # not audio
    _assert_refused(_post(server, b"hello", "text/plain"), 415, "content_type")  # wrong content type
    _assert_refused(_post(server, json.dumps({"a": 1}).encode(), "application/json"), 415, "content_type")
    part = requests.post(f"{server.url}/v1/score", files={"file": ("x.txt", b"words", "text/plain")},
                         headers=server.headers(), timeout=60)
    _assert_refused(part, 415, "content_type")
    _assert_refused(_post(server, b"", "audio/wav"), 400, "empty")
    _assert_refused(_post(server, b"\x00" * (2 * 2**20)), 413, "too_large")  # Content-Length over 1 MiB
    long = _wav(61.0, noise=0.001, fmt="FLAC")  # 61 s: over the 60 s limit, though under the byte limit
    assert len(long) < 2**20
    _assert_refused(_post(server, long), 413, "too_long")
    hour = io.BytesIO()  # an hour of digital silence: ~180 kB of FLAC, refused from its header, not decoded
    sf.write(hour, np.zeros(3600 * RATE, np.int16), RATE, format="FLAC", subtype="PCM_16")
    _assert_refused(_post(server, hour.getvalue()), 413, "too_long")
    quiet = io.BytesIO()
    sf.write(quiet, np.zeros(4 * RATE, np.float32), RATE, format="WAV", subtype="FLOAT")
    _assert_refused(_post(server, quiet.getvalue()), 422, "near_silent")
    _assert_refused(_post(server, _wav(20 / RATE)), 422, "too_short")  # 20 samples; the tiny model needs 40
    no_token = requests.post(f"{server.url}/v1/score", data=wav, headers={"Content-Type": "audio/wav"}, timeout=30)
    _assert_refused(no_token, 401, "unauthorized")
    wrong = requests.post(f"{server.url}/v1/score", data=wav, timeout=30,
                          headers={"Content-Type": "audio/wav", "Authorization": "Bearer nope"})
    _assert_refused(wrong, 401, "unauthorized")
    assert _post(server, wav).status_code == 200  # still serving
    metrics = requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=30).text
    for kind in ("unreadable", "truncated", "content_type", "too_large", "too_long", "near_silent"):
        assert f'posttrain_serve_errors_total{{kind="{kind}"}}' in metrics
    assert _metric(server, "posttrain_serve_unauthorized_requests_total") >= 2  # one unlabelled series
    assert 'posttrain_serve_requests_total{endpoint="/v1/score",status="200"}' in metrics
    assert "posttrain_serve_queue_depth" in metrics and "posttrain_serve_request_seconds_bucket" in metrics


def test_an_oversize_stream_is_refused_before_it_ends(server):
    """A chunked upload that passes the byte limit and then stalls: the 413 must come while the body is
    still open (a limit checked only after reading everything would wait for ever)."""
    host = urlparse(server.url)
    with socket.create_connection((host.hostname, host.port), timeout=20) as conn:
        conn.sendall((f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                      f"Authorization: Bearer {server.headers()['Authorization'].split()[1]}\r\n"
                      f"Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"\x00" * 65536
        for _ in range(2**20 // len(chunk) + 2):  # just over 1 MiB, then nothing more and no final chunk
            conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        reply = b""
        while b"}" not in reply:  # headers and the JSON body may come in separate segments
            part = conn.recv(4096)
            if not part:
                break
            reply += part
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "too_large" in reply


def test_a_full_queue_gets_503_with_retry_after(server):
    """60 s in flight at most and one waiting request: of simultaneous 50 s uploads, one runs, one may
    wait, the others are told to come back; none fails otherwise, and the service stays ready."""
    data = _wav(50.0, noise=0.001, fmt="FLAC")
    results: list[requests.Response] = []
    def call():
        results.append(_post(server, data))
    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for response in results:
        if response.status_code == 503:
            _assert_refused(response, 503, "busy")
            assert response.headers["Retry-After"] == "2"
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_openapi_health_page_and_no_file_left(server):
    schema = requests.get(f"{server.url}/openapi.json", headers=server.headers(), timeout=30).json()
    assert {"/v1/score", "/v1/score/batch", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    assert 'id="verdict"' in requests.get(server.url, timeout=10).text
    time.sleep(0.5)  # the refused stream's handler may still be unwinding
    (service,) = server.temp_dir.iterdir()  # the service's own folder, and nothing left in it but its lock
    assert [path.name for path in service.rglob("*")] == [".lock"]


def test_config_refuses_a_public_address_without_tokens():
    from posttrain.serve.config import ServeConfig

    with pytest.raises(ValueError, match="serve.host"):
        ServeConfig(model="m", host="0.0.0.0").validate()
    ServeConfig(model="m", host="0.0.0.0", allow_public=True).validate()
    ServeConfig(model="m", host="0.0.0.0", tokens=("t",)).validate()
    with pytest.raises(ValueError, match="serve.hop_seconds"):
        ServeConfig(model="m", window_seconds=2, hop_seconds=3).validate()
    with pytest.raises(ValueError, match="serve.max_upload_seconds"):
        ServeConfig(model="m", max_upload_seconds=100, max_inflight_seconds=50).validate()
    with pytest.raises(ValueError, match="serve.precision"):
        ServeConfig(model="m", precision="fp16").validate()
    assert "t0ken" not in repr(ServeConfig(model="m", tokens=("t0ken",)))


def test_page_in_a_headless_browser_shows_verdict_probability_and_timeline(server, tmp_path):
    """Upload a demo recording through the page in real headless chromium; the page must show the
    verdict and P(real) the API gives for the same file, and draw the timeline. The screenshot is kept
    as a test artefact (``page.png`` in this test's pytest tmp dir)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from posttrain.data.demo import KLETTRES_DIR

    demo = sorted(KLETTRES_DIR.glob("*/alpha/*.ogg"))
    if not demo:
        pytest.fail(f"no klettres recordings under {KLETTRES_DIR} (apt-get install klettres-data)")
    demo_file = demo[0]
    expected = requests.post(f"{server.url}/v1/score", data=demo_file.read_bytes(), timeout=60,
                             headers=server.headers(**{"Content-Type": "audio/ogg"})).json()
    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.get(server.url)
        driver.find_element(By.ID, "token").send_keys(server.headers()["Authorization"].split()[1])
        picker = driver.find_element(By.ID, "file")
        driver.execute_script("arguments[0].hidden = false;", picker)  # the drop zone's picker, shown for the driver
        picker.send_keys(str(demo_file))
        verdict = driver.find_element(By.ID, "verdict")
        WebDriverWait(driver, 60).until(lambda _: verdict.get_attribute("data-state") in ("done", "error"))
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert verdict.get_attribute("data-state") == "done", verdict.text
        assert verdict.text == expected["decision"]
        assert driver.find_element(By.ID, "probability").text == f"{expected['p_real']:.4f}"
        painted = driver.execute_script(
            "const c = document.getElementById('timeline'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;")
        assert painted > 500  # the window segments and the threshold line were drawn
        ticks = json.loads(driver.find_element(By.ID, "timeline").get_attribute("data-ticks"))
        assert ticks[0] == "0 s" and len(ticks) >= 2  # a time axis, labelled in seconds, up to the file's length
        assert float(ticks[-1].split()[0]) <= expected["seconds"] < float(ticks[-1].split()[0]) + 10
    finally:
        driver.quit()
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
