"""MLflow tracking from global rank 0 only.

The default store is ``sqlite:///mlflow.db`` relative to the working directory (MLflow 3 refuses a
plain file store unless told otherwise); ``tracking.tracking_uri`` takes any URI. A resumed job
passes the run id saved in its checkpoint and continues the same run. Every other rank gets a
tracker whose methods do nothing, so the training loop never branches on the rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import TrackingConfig

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

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
