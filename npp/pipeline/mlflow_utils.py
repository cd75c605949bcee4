"""MLflow helpers shared by the stages: flat params, and experiments the UI opens as training experiments."""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or a SQLite file in the working directory (the one default, here)."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def mark_training_experiment(name: str, artifact_location: str | None = None) -> str:
    """Get or create the experiment (artifacts at `artifact_location` if new) and tag it as model training;
    returns its id."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    if artifact_location and client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifact_location)
    exp = mlflow.set_experiment(name)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.tracking.MlflowClient().set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


class TrackingUnreachable(Exception):
    """MLflow did not answer; what could not be logged is named, with where it is kept."""


def log_metrics_once(client, run_id: str, metrics: dict[str, float], step: int) -> int:
    """Log the metrics at `step`, skipping every key that already has a point at that step (a rerun after a
    failed or interrupted logging adds nothing twice). Returns how many were sent."""
    from mlflow.entities import Metric

    fresh = {k: float(v) for k, v in metrics.items()
             if not any(m.step == step for m in client.get_metric_history(run_id, k))}
    if fresh:
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in fresh.items()])
    return len(fresh)


def experiment_urls(base_url: str, experiment_id: str) -> dict[str, str]:
    """Where MLflow 3's UI shows an experiment's training runs: the runs table and the chart view (the x-axis,
    e.g. train_pflops for FID against compute, is chosen in the chart's settings: the URL cannot carry it)."""
    runs = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return {"runs": runs, "charts": runs + "?compareRunsMode=CHART"}
