"""Every result of a run lands in its MLflow run, as users expect: the evaluation of a training checkpoint
attaches its metrics and report files (the PNGs, metrics.json, result.yaml, the score file), the export
logs the model folder with its card, and the experiment opens on MLflow's model-training view. Checked in
the store, then in a real ``mlflow ui`` in headless Chromium (the screenshot is kept: ``mlflow_run.png``
in this test's tmp folder)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
from conftest import chromium_driver, train_tiny

from posttrain.cli import main
from posttrain.dist import free_port
from posttrain.train.tracking import run_page

pytestmark = pytest.mark.slow


def _train(shard_dir, tmp_path) -> None:
    done = train_tiny(tmp_path / "run", shard_dir, "train.max_steps=3", "tracking.enabled=true",
                      "tracking.system_metrics=false", "tracking.experiment=mlflow-e2e", "tracking.run_name=tiny-run",
                      "train.log_every_steps=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]


def _start_ui(tmp_path):
    port = free_port()
    # one worker and no job runner: the UI of one run on two cores
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                                f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "ui.log", "wb"),
                               env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.3)
    process.kill()
    pytest.fail(f"mlflow ui not ready in 90 s: {(tmp_path / 'ui.log').read_text()[-2000:]}")


def test_eval_and_export_of_a_tracked_run_land_in_that_run_and_show_in_the_ui(shard_dir, tmp_path, monkeypatch,
                                                                                capsys):
    from mlflow.tracking import MlflowClient

    _train(shard_dir, tmp_path)
    monkeypatch.chdir(tmp_path)  # the run's store is sqlite:///mlflow.db relative to where it trained
    assert main(["eval", "--model", "run/checkpoints", "--shards", str(shard_dir), "--out", "run/eval/test",
                 "--window-seconds", "0", "--bootstrap", "100", "--no-progress", "--by", "attack", "language"]) == 0
    assert main(["publish", "--checkpoint", "run/checkpoints", "--out", "run/published"]) == 0
    out = capsys.readouterr().out
    assert "MLflow: test metrics (test/test/...) and the report files (eval/test/) attached" in out
    assert "MLflow: the exported model (model/, with its card) logged" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlflow-e2e")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"  # attaching results does not touch the run's status
    metrics = run.data.metrics
    for name in ("test/test/eer", "test/test/min_dcf", "test/test/auc", "test/test/eer_ci_low", "train/loss",
                 "test/test/eer/attack/A01", "test/test/eer/language/en"):
        assert name in metrics, sorted(metrics)
    import json

    reported = json.loads((tmp_path / "run/eval/test/metrics.json").read_text())["pooled"]
    assert metrics["test/test/eer"] == pytest.approx(reported["eer"])
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "eval/test")}
    assert {f"eval/test/{name}" for name in ("det.png", "histograms.png", "metrics.json", "result.yaml", "scores.csv",
                                             "metrics.txt")} <= logged
    model = {item.path for item in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/README.md", "model/config.json", "model/model.safetensors"} <= model

    process, url = _start_ui(tmp_path)
    driver = chromium_driver(tmp_path / "profile", width=1400, height=1000)
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        page = f"{url}/{run_page(experiment.experiment_id, run.info.run_id)}"
        driver.get(page)
        WebDriverWait(driver, 60).until(lambda d: "test/test/eer" in d.find_element(By.TAG_NAME, "body").text)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "tiny-run" in body and "test/test/min_dcf" in body and "Model training" in body
        heading = driver.find_element(By.XPATH, "//*[starts-with(normalize-space(text()), 'Metrics (')]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", heading)
        time.sleep(0.5)
        driver.save_screenshot(str(tmp_path / "mlflow_run.png"))
        driver.get(page.replace("?", "/artifacts/eval/test/det.png?"))
        WebDriverWait(driver, 60).until(lambda d: any((img.get_attribute("src") or "").startswith("blob:")
                                                      and img.size["height"] > 100
                                                      for img in d.find_elements(By.TAG_NAME, "img")))
        driver.save_screenshot(str(tmp_path / "mlflow_det.png"))
    finally:
        driver.quit()
        process.terminate()
        process.wait(timeout=30)
    assert (tmp_path / "mlflow_run.png").read_bytes()[:4] == b"\x89PNG"
