import subprocess
import sys

from npp.app.cli import main


def test_schedule_command_prints_stages_and_cost(capsys):
    main(["schedule", "--patch-levels", "3", "--epoch-rate", "0.5", "--epochs", "300", "--steps-per-epoch", "10",
          "--model", "GPT-XXL"])
    out = capsys.readouterr().out
    assert "stage 0: k=4 steps [0, 750)" in out
    assert "0.5765" in out


def test_user_error_is_one_line_and_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "npp", "schedule", "--schedule", "4:0.5,2:0.5"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("npp: error:") and "must be 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpu_check_refuses_cleanly_without_cuda():
    import os

    repo = os.path.join(os.path.dirname(__file__), "..")
    proc = subprocess.run(["make", "-s", "gpu-check"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here; nothing was run" in proc.stdout


def test_ui_prints_the_url_of_the_experiments_training_runs(tmp_path):
    """MLflow 3's UI opens an experiment on its GenAI overview; `make ui` (npp ui) names the runs view and the chart
    view in the model-training view, with routes and a URL parameter the installed MLflow UI reads."""
    import glob
    import os
    import re

    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = mlflow.tracking.MlflowClient(uri).create_experiment("npp")
    proc = subprocess.run([sys.executable, "-m", "npp", "ui", "--serve", "False"], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs = f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert f"{runs}\n" in proc.stdout and f"{runs}&compareRunsMode=CHART" in proc.stdout
    js = os.path.join(os.path.dirname(mlflow.__file__), "server", "js", "build", "static", "js", "*.js")
    bundle = "".join(open(f, errors="replace").read() for f in glob.glob(js))
    assert '"/experiments/:experimentId/runs"' in bundle and re.search(r'"compareRunsMode"', bundle)
    assert re.search(r'CHART', bundle)
    # the view is read from the URL's workflowType before the browser's stored choice (default "genai")
    assert re.search(r'MACHINE_LEARNING="machine_learning"', bundle) and 'get("workflowType")' in bundle
