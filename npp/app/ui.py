"""`npp ui`: the MLflow UI on an experiment's training runs (the comparison desk: docs/mlflow.md)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from npp.runtime.flags import Checked, documented, flag, need
from npp.runtime.mlflow_utils import EXPERIMENT


@documented
@dataclass(frozen=True)
class UiConfig(Checked):
    """The flags of `npp ui`."""

    experiment: str = flag(EXPERIMENT, "MLflow experiment")
    host: str = flag("127.0.0.1", "address the UI listens on")
    port: int = flag(5000, "port the UI listens on")
    serve: bool = flag(True, "serve the UI (--noserve: print the URLs only)")

    def validate(self) -> None:
        need(1 <= self.port <= 65535, f"--port must lie in 1..65535, got {self.port}")


def open_ui(plan: UiConfig) -> None:
    """Print the URLs of the experiment's training runs; then, unless the tracking URI is a server that serves the
    UI itself, become `mlflow ui` on the tracking store (exec: its signals and exit are the command's)."""
    import mlflow

    from npp.runtime.mlflow_utils import experiment_urls, tracking_uri

    uri = tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    base = uri if remote else f"http://{plan.host}:{plan.port}"
    exp = mlflow.tracking.MlflowClient(uri).get_experiment_by_name(plan.experiment)
    if exp is None:
        print(f"no experiment {plan.experiment!r} in {uri} yet (train a run first); the UI opens on {base}")
    else:
        urls = experiment_urls(base, exp.experiment_id)
        print(f"MLflow UI, experiment {plan.experiment!r}:\n  training runs: {urls['runs']}\n"
              f"  charts:        {urls['charts']}  (pick train_pflops or train_hours as the x-axis: FID against "
              "training compute)",
              flush=True)
    if plan.serve and not remote:
        mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
        os.execv(mlflow_bin, [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", plan.host, "--port",
                              str(plan.port)])
