"""MLflow tracking from global rank 0 only.

The default store is ``sqlite:///mlflow.db`` relative to the working directory (MLflow 3 refuses a
plain file store unless told otherwise); ``tracking.tracking_uri`` takes any URI. A resumed job
passes the run id saved in its checkpoint and continues the same run. Every other rank gets a
tracker whose methods do nothing, so the training loop never branches on the rank.

Everything that comes of a run lands in that run: ``training_run`` finds it from a model's identity (a
posttrain checkpoint records its run id and tracking settings), ``log_report`` attaches an evaluation
(its metrics as ``test/<name>/...``, its report files under ``eval/<name>/``) and ``log_model`` an
exported model folder with its card. The experiment is tagged as a model-training one, so the MLflow UI
opens it on its training-runs view.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from posttrain.config import TrackingConfig, from_dict

# MLflow 3's experiment kind: "custom_model_development" is the UI's "Machine learning" (training runs) view
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"

# MLflow caps a parameter value's length; longer values (long shard lists) are cut, not rejected.
MAX_PARAM_CHARS = 6000


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists kept whole, as their text)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


class Tracker:
    """``Tracker(cfg, active)``: MLflow when ``active`` (rank 0) and ``cfg.enabled``, else no-ops."""

    def __init__(self, cfg: TrackingConfig, active: bool):
        self.cfg = cfg
        self.active = bool(active and cfg.enabled)
        self.run_id: str | None = None
        self._mlflow: Any = None

    def start(self, run_id: str | None, params: dict[str, Any]) -> str | None:
        """Start (or, with ``run_id``, continue) the run and log the flattened ``params``.

        On a continued run, parameters already logged keep their first value (MLflow forbids
        changing one); a changed value is recorded as a tag ``param_changed.<key>``."""
        if not self.active:
            return None
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        experiment = mlflow.set_experiment(self.cfg.experiment)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment.experiment_id,
                               run_name=None if run_id else self.cfg.run_name,
                               log_system_metrics=self.cfg.system_metrics)
        self.run_id = run.info.run_id
        flat = flatten(params)
        logged = mlflow.get_run(self.run_id).data.params if run_id else {}
        fresh = {key: value for key, value in flat.items() if key not in logged}
        changed = {f"param_changed.{key}": value for key, value in flat.items()
                   if key in logged and logged[key] != value}
        keys = sorted(fresh)
        for start in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params({key: fresh[key] for key in keys[start:start + 100]})
        if changed:
            mlflow.set_tags(changed)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and self._mlflow is not None and Path(path).is_file():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self.active and self._mlflow is not None and Path(folder).is_dir():
            self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None


# ------------------------------------------------------------------------- results of a finished run


class NotAttached(Exception):
    """Why a result was not attached to a training run (said in one line, the result is still written)."""


def training_run(identity: dict[str, Any]) -> tuple[TrackingConfig, str]:
    """``(tracking settings, run id)`` of the training run a model came from (its identity, as the loading
    facade returns it); ``NotAttached`` saying why there is none."""
    training = identity.get("training") or {}
    run_id = training.get("mlflow_run_id")
    section = (training.get("config") or {}).get("tracking")
    if not run_id or section is None:
        raise NotAttached("the model is not a checkpoint of an MLflow-tracked posttrain run")
    cfg = from_dict(TrackingConfig, section, "tracking")
    if not cfg.enabled:
        raise NotAttached("its training run had tracking off")
    if cfg.tracking_uri.startswith("sqlite:///"):
        store = Path(cfg.tracking_uri[len("sqlite:///"):])
        if not store.is_file():  # MLflow would quietly make an empty store here
            raise NotAttached(f"{cfg.tracking_uri}: no such store from this folder (run from the folder the "
                              f"training ran in)")
    return cfg, run_id


def metric_name(name: str) -> str:
    """``name`` with what MLflow refuses in a metric name (anything but letters, digits, ``_-. :/``) as ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def report_metrics(document: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a report's ``metrics.json`` as MLflow metrics: pooled ``<prefix>/<metric>``, the EER CI
    bounds, and per group ``<prefix>/eer/<grouping>/<value>``."""
    metrics = {f"{prefix}/{name}": float(value) for name, value in document["pooled"].items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    ci = document["pooled"].get("eer_ci") or {}
    metrics.update({f"{prefix}/eer_ci_{side}": float(ci[side]) for side in ("low", "high") if side in ci})
    for by, groups in document.get("groups", {}).items():
        for name, values in groups.items():
            if isinstance(values.get("eer"), (int, float)):
                metrics[f"{prefix}/eer/{by}/{name}"] = float(values["eer"])
    return {metric_name(key): value for key, value in metrics.items()}


def _client(cfg: TrackingConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri)


def log_report(cfg: TrackingConfig, run_id: str, name: str, document: dict[str, Any], files: dict[str, Path],
               step: int = 0) -> None:
    """Attach an evaluation report to run ``run_id`` (whatever its status: a run still training stays
    RUNNING): its metrics and its files (``eval/<name>/``)."""
    import time

    from mlflow.entities import Metric

    client = _client(cfg)
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, value in sorted(report_metrics(document, f"test/{name}").items())]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in files.values():
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_path=f"eval/{name}")


def log_model(cfg: TrackingConfig, run_id: str, folder: Path) -> None:
    """Attach an exported model folder (weights, configs, card) to run ``run_id`` as ``model/``."""
    _client(cfg).log_artifacts(run_id, str(folder), artifact_path="model")


def run_page(experiment_id: str, run_id: str) -> str:
    """The path of a run's page in ``mlflow ui``, in its model-training view (MLflow 3 opens on GenAI)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_page_of(cfg: TrackingConfig, run_id: str) -> str:
    return run_page(_client(cfg).get_run(run_id).info.experiment_id, run_id)
