"""MLflow tracking for the trainer: rank 0 only, params once, reattach on resume.

The run id lives in the checkpoint's client state and in `<run>/mlflow_run_id`, so
a requeued job continues the same MLflow run (params are immutable in MLflow, so
they are logged only when the run is created).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

from npp.pipeline.mlflow_utils import flatten, mark_training_experiment  # noqa: F401 (re-exported)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Thin wrapper over mlflow; a no-op on ranks other than 0 or when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: Optional[str] = None
        self._mlflow = None
        # per metric: a resumed run logs nothing at or below the last step MLflow already has for it
        self.logged_through: dict[str, int] = {}

    def start(self, experiment: str, run_name: str, run_id: Optional[str], params: dict, tags: dict, artifacts: list[str],
              dataset: Optional[dict] = None, system_metrics: bool = True) -> None:
        """Attach to (run_id) or create the run. A new run gets the params once, the artifacts, and the
        shard set as its dataset input (name + digest: the UI's Dataset column). The experiment is tagged
        as a training experiment, so MLflow 3's UI opens on its runs (not the GenAI overview). System
        metrics (CPU/GPU utilisation and memory) are sampled by MLflow in the background."""
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
        if run_id:
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            client = mlflow.tracking.MlflowClient()
            # MLflow's own system/ metrics are sampled in time, not steps, and hold thousands of points after
            # days: reading their histories would slow every restart, and we never log them
            for key in client.get_run(run_id).data.metrics:
                if not key.startswith("system/"):
                    self.logged_through[key] = max((m.step for m in client.get_metric_history(run_id, key)), default=0)
        else:
            exp = mark_training_experiment(experiment)
            mlflow.start_run(run_name=run_name, tags=tags, experiment_id=exp, log_system_metrics=system_metrics)
            flat = flatten(params)
            items = list(flat.items())
            for i in range(0, len(items), 100):  # the API takes at most 100 params per call
                mlflow.log_params(dict(items[i : i + 100]))
            for path in artifacts:
                mlflow.log_artifact(path)
            if dataset:
                from mlflow.data.dataset_source_registry import resolve_dataset_source
                from mlflow.data.meta_dataset import MetaDataset

                source = resolve_dataset_source(dataset["source"])
                mlflow.log_input(MetaDataset(source=source, name=dataset["name"], digest=dataset["digest"]),
                                 context="training")
        self.run_id = mlflow.active_run().info.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._mlflow is None:
            return
        fresh = {k: float(v) for k, v in metrics.items() if step > self.logged_through.get(k, 0)}
        if fresh:
            self._mlflow.log_metrics(fresh, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
