"""Tracking is never fatal: the MLflow server goes away mid-run and comes back; the run trains on and MLflow ends
with every point once and the run's real status."""

import json
import signal
import subprocess
import time

import pytest

from tests.helpers import launch_cmd, read_metrics, run_env, signal_tree


def _wait_for_step(proc, run, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if read_metrics(run) and read_metrics(run)[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_a_tracking_server_restart_mid_run_loses_nothing(shard_set, tmp_path, mlflow_server):
    run = tmp_path / "run"
    env = {**run_env(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server.url,
           # a short retry budget per request: an outage longer than MLflow's own retries
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    total = 40
    proc = subprocess.Popen(launch_cmd(shard_set, run, total_steps=total, log_every=2, sync_every=1, ckpt_every=1000),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(proc, run, 8)
        signal_tree(proc.pid, signal.SIGSTOP)  # the job holds still while the server goes away
        mlflow_server.stop()
        signal_tree(proc.pid, signal.SIGCONT)
        _wait_for_step(proc, run, 24)  # it trains on, 16 steps, with no server
        signal_tree(proc.pid, signal.SIGSTOP)
        mlflow_server.start()
        signal_tree(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("is unreachable") == 1, out[-3000:]  # one warning for the outage
    assert "answers again" in out
    run_id = (run / "mlflow_run_id").read_text().strip()
    got = mlflow_server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert got["info"]["status"] == "FINISHED"
    hist = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted(m["step"] for m in hist) == list(range(2, total + 1, 2))  # every log step, once
    outbox = [json.loads(line) for line in (run / "mlflow_outbox.jsonl").read_text().splitlines()]
    assert [r["step"] for r in outbox if "loss" in r["metrics"]] == list(range(2, total + 1, 2))
