"""MLflow helpers shared by the stages: flat params, and experiments the UI opens as training experiments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
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


EXPERIMENT = "npp"  # the MLflow experiment every command logs to and reads from, unless told another
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


# MLflow 3's UI shows an experiment in its GenAI view unless the URL (or what the browser last chose) says
# `workflowType=machine_learning`; the URL wins over the browser's choice
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_urls(base_url: str, experiment_id: str) -> dict[str, str]:
    """Where MLflow 3's UI shows an experiment's training runs, in its model-training view: the runs table and the
    chart view (the x-axis, e.g. train_pflops for FID against compute, is chosen in the chart's settings: the URL
    cannot carry it), and the prefix of a run's page (`run` + RUN_ID + `?` + MODEL_TRAINING_VIEW)."""
    runs = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return {"runs": f"{runs}?{MODEL_TRAINING_VIEW}", "charts": f"{runs}?{MODEL_TRAINING_VIEW}&compareRunsMode=CHART",
            "run": f"{runs}/"}


def start_server(backend_uri: str, port: int, artifacts: str | None = None, output=subprocess.DEVNULL,
                 timeout: float = 120.0) -> subprocess.Popen:
    """`mlflow server` for a tracking store on 127.0.0.1:`port`, in a session of its own (`stop_server` ends its
    workers too), returned once it answers /health; RuntimeError when it does not within `timeout` seconds."""
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow_bin, "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", *(["--artifacts-destination", artifacts] if artifacts else [])]
    proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server for {backend_uri} did not answer on port {port} in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Kill a `start_server` server: its whole session (gunicorn/uvicorn workers too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
