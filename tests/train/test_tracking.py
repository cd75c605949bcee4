"""Tracking is never fatal: the MLflow server goes away mid-run and comes back; the run trains on and MLflow ends
with every point once and the run's real status; a request whose answer is lost after the server did the work (a
point, the run's creation) is retried without doubling it."""

import json
import signal
import subprocess
import time

import pytest

from npp.runtime.outbox import Outbox
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
    hist = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="Results/loss")["metrics"]
    assert sorted(m["step"] for m in hist) == list(range(2, total + 1, 2))  # every log step, once
    outbox = [json.loads(line) for line in (run / "mlflow_outbox.jsonl").read_text().splitlines()]
    assert [r["step"] for r in outbox if "Results/loss" in r["metrics"]] == list(range(2, total + 1, 2))


def _metrics_batch(path: str, body: dict) -> bool:
    return path.endswith("/runs/log-batch") and bool(body.get("metrics"))


def _run_creation(path: str, body: dict) -> bool:
    return path.endswith("/runs/create")


class _LosesAnswers:
    """A real HTTP hop in front of the MLflow server that forwards every request and, for the first `drop`
    requests `lose(path, json_body)` picks, throws the server's answer away and closes the connection: the server
    has done the work, the client sees a dropped connection (a server killed between commit and reply, a cut)."""

    def __init__(self, upstream: str, drop: int, lose):
        import http.client
        import http.server
        import threading
        import urllib.parse

        from npp.runtime.ranks import free_port

        up = urllib.parse.urlsplit(upstream)
        hop = self
        self.drop, self.dropped = drop, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                answer = conn.getresponse()
                data = answer.read()
                if hop.dropped < hop.drop and lose(self.path, json.loads(body or b"{}")):
                    hop.dropped += 1
                    self.close_connection = True  # stored upstream; the client gets no answer
                    return
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _track_through(hop, tmp_path, monkeypatch):
    """A run of three points logged through `hop`, which must have lost what it was told to. Step 4 comes after
    step 6 (as an evaluation of an earlier checkpoint may): the rule is per step, not "nothing below the newest"."""
    from npp.pipeline.runs import RunFolder
    from npp.train.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", hop.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no resend inside the client: ours is what counts
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    said = []
    tracker = Tracker(True, run, log=said.append)
    try:
        tracker.start("npp-test", "lost-answer", None, params={"lr": 1e-3}, tags={"zero_stage": "2"}, artifacts=[],
                      system_metrics=False)
        for step in (2, 6, 4):
            tracker.log({"loss": 1.0 / step}, step)
        tracker.finish(wait_s=60)
    finally:
        hop.close()
    assert hop.dropped == hop.drop
    return tracker, run, said


def test_a_point_whose_answer_is_lost_is_stored_once(mlflow_server, tmp_path, monkeypatch):
    """The CI fault: the server stored step 2 and went down before it answered; the sender sent step 2 again
    later, with a new time stamp, and MLflow held it twice. A resend must be the same row."""
    tracker, run, said = _track_through(_LosesAnswers(mlflow_server.url, 1, _metrics_batch), tmp_path, monkeypatch)
    assert sum("is unreachable" in line for line in said) == 1, said  # the lost answer read as an outage
    hist = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=tracker.run_id, metric_key="loss")
    assert sorted(m["step"] for m in hist["metrics"]) == [2, 4, 6]
    sent = {m["step"]: m["timestamp"] for m in hist["metrics"]}
    assert {r["step"]: r["t"] for r in Outbox(run.outbox).records()} == sent  # the time each point was logged at


def test_a_run_whose_creation_answer_is_lost_is_created_once(mlflow_server, tmp_path, monkeypatch):
    """create_run stored the run and its answer was lost: the retry finds that run, no empty twin stays RUNNING."""
    tracker, run, said = _track_through(_LosesAnswers(mlflow_server.url, 1, _run_creation), tmp_path, monkeypatch)
    assert sum("is unreachable" in line for line in said) == 1, said
    exp = mlflow_server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="npp-test")["experiment"]
    runs = mlflow_server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [tracker.run_id], runs
    assert runs[0]["info"]["status"] == "FINISHED"
    assert run.mlflow_run_id() == tracker.run_id
    assert [p["key"] for p in runs[0]["data"]["params"]] == ["lr"]
    hist = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=tracker.run_id, metric_key="loss")
    assert sorted(m["step"] for m in hist["metrics"]) == [2, 4, 6]
