"""MLflow tracking for the trainer (rank 0): never fatal, never in the training loop's way, nothing lost.

Every point the trainer logs is first appended to `RUN/mlflow_outbox.jsonl` (a local
file, the record of what MLflow should hold) and queued; one background thread sends
the queue to MLflow in order with the client API. When the tracking server is
unreachable (restarted for maintenance, a network cut, a locked database) the thread
warns once per outage, keeps the queue and retries with backoff up to a minute apart;
training never waits for it. When the server is back it sends what it missed. At the
end the run is ended with its real status (FINISHED, KILLED for a stop, FAILED) after
waiting a bounded time (`NPP_MLFLOW_DRAIN_S`, 120 s) for the queue to drain; what is
still unsent then stays in the outbox, and the next start of the run sends it: every
start replays the outbox, and MLflow gets no point of a metric at a step it already holds
(npp.runtime.outbox: the one outbox and rule of `npp eval watch` and `npp eval` too), so each
step's point appears once, also across resumes and outages. The outbox is cut back to the
checkpoint's step on resume, like metrics.jsonl.

An answer lost after the server did the work (it went down between storing and
answering) doubles nothing: a point is sent again with the time it was logged at,
which MLflow's store takes once, and a retried run creation first looks for the run
by the token tag it was created with (`npp.create_token`).

The run id lives in the checkpoint's client state and in `RUN/mlflow_run_id`, so a
requeued job continues the same MLflow run (params are immutable in MLflow, so they
are logged only when the run is created). A run created while the server is down gets
its id when the server answers.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable

from npp.pipeline.runs import RunFolder
from npp.runtime.environment import mlflow_drain_s
from npp.runtime.metric_names import is_training_loss
from npp.runtime.mlflow_utils import flatten, mark_training_experiment, tracking_uri
from npp.runtime.outbox import Delivery, Outbox, now_ms

CREATE_TAG = "npp.create_token"  # set on the run at creation: finds it again when create_run's answer was lost


class Tracker:
    """The trainer's MLflow run; a no-op on ranks other than 0 or when disabled."""

    def __init__(self, enabled: bool, run: RunFolder | None = None, log: Callable[[str], None] = print):
        self.enabled = enabled
        self.run = run
        self._outbox = Outbox(run.outbox) if run is not None else None
        self.run_id: str | None = None
        self._log = log
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False
        self._down_since: float | None = None
        self._monitor = None
        self._client = None
        self._delivery: Delivery | None = None  # what the MLflow run holds, per metric (npp.runtime.outbox)
        # the run's Duration is its training: it ends at the time of the newest training-step point MLflow holds
        # (a `loss`), not when an evaluation or export after it, or a later start with nothing left to train, ends
        # it; points sent again from the outbox after a crash or an outage count with the time they were logged at
        self._last_loss_ms: int | None = None

    # --- the training thread's side -------------------------------------------------
    def start(self, experiment: str, run_name: str, run_id: str | None, params: dict, tags: dict,
              artifacts: list[str], dataset: dict | None = None, system_metrics: bool = True,
              resume_step: int = 0) -> None:
        """Queue the run's creation (params, artifacts, dataset input: the UI's Dataset column) or its
        reattachment, then the outbox's points up to `resume_step` (those MLflow lacks are sent), and start
        the sender. The experiment is tagged as a training experiment, so MLflow 3's UI opens on its runs."""
        if not self.enabled:
            return
        # fail fast inside one request: the sender retries for as long as it takes
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            os.environ.setdefault(var, value)
        self.run_id = run_id
        self._open_args = dict(experiment=experiment, run_name=run_name, params=params, tags=tags,
                               artifacts=artifacts, dataset=dataset, system_metrics=system_metrics)
        self._created = run_id is not None
        self._create_token: str | None = None  # set by the first create_run: its retry looks for that run first
        try:  # once here, so the run (and RUN/mlflow_run_id) exists before the first step when the server answers
            self._open()
        except Exception as e:
            self._outage(e)
            self._queue.put(("open", None))  # the sender creates or reattaches it when the server answers
        if self._outbox is not None:
            self._outbox.cut_after(resume_step)  # the steps after the checkpoint are redone
            for rec in self._outbox.records():  # the backfill: points an earlier start could not send
                self._queue.put(("metrics", rec))
        self._thread = threading.Thread(target=self._work, name="npp-mlflow", daemon=True)  # sends the queue
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self._thread is None:
            return
        # the time is the point's own, fixed here: a resend after a lost answer repeats it exactly, and MLflow's
        # store keeps one row per (key, step, time, value), so the point is not doubled (and its wall time is
        # when it was logged, not when an outage ended)
        if self._outbox is not None:
            rec = self._outbox.append(step, metrics)
        else:
            rec = {"step": int(step), "t": now_ms(), "metrics": {k: float(v) for k, v in metrics.items()}}
        self._queue.put(("metrics", rec))

    def tag(self, tags: dict[str, str]) -> None:
        """Set tags on the run (the exported model's path, ...), in order with the metrics, never waiting."""
        if self.enabled and self._thread is not None:
            self._queue.put(("tags", {k: str(v) for k, v in tags.items()}))

    def finish(self, status: str = "FINISHED", wait_s: float | None = None, model: tuple | None = None) -> bool:
        """End the run with `status` once the queue is sent, waiting at most wait_s (NPP_MLFLOW_DRAIN_S); True
        when everything was sent and the run ended. `model` (path, step): the exported checkpoint, then logged
        as the run's model (log_exported_model) only when MLflow took everything else: an unreachable server
        would hold the job in MLflow's own retries (`npp train export` records it later)."""
        if not self.enabled or self._thread is None:
            return False
        wait_s = mlflow_drain_s() if wait_s is None else wait_s
        self._queue.put(("end", status))
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=wait_s)
        if self._thread.is_alive():
            where = f"{self._outbox}" if self._outbox else "this process"
            self._log(f"warning: MLflow at {tracking_uri()} is still unreachable after {wait_s:.0f} s: the last "
                      f"{self._queue.qsize()} queued record(s) stay in {where}; the next start of this run sends them "
                      f"(the MLflow run shows RUNNING until then)")
        sent = not self._thread.is_alive()
        self._stop_monitor()
        self._thread = None
        if sent and model is not None and self.run_id:
            log_exported_model(self.run_id, *model)
        return sent

    # --- the sender thread ----------------------------------------------------------
    def _work(self) -> None:
        backoff = 2.0
        while True:
            kind, item = self._queue.get()
            while True:
                try:
                    self._do(kind, item)
                    break
                except Exception as e:  # any failure of the tracking side: keep the point, retry later
                    self._outage(e)
                    self._wake.wait(timeout=backoff)
                    self._wake.clear()
                    if self._closing:
                        backoff = min(backoff, 2.0)
                    backoff = min(60.0, backoff * 2)
            if self._down_since is not None:
                self._log(f"MLflow at {tracking_uri()} answers again after {time.time() - self._down_since:.0f} s: "
                          "sending the points it missed")
                self._down_since = None
                backoff = 2.0
                if kind != "end" and self.run_id and self._open_args["system_metrics"]:
                    self._start_monitor()  # MLflow's monitor gave up during the outage
            if kind == "end":
                return

    def _outage(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            first = str(error).splitlines()[0][:200] if str(error) else ""
            where = f"{self._outbox}" if self._outbox else "memory"
            self._log(f"warning: MLflow at {tracking_uri()} is unreachable ({type(error).__name__}: {first}); "
                      f"training goes on, every point is kept in {where} and sent when it answers again")

    def _do(self, kind: str, item) -> None:
        if kind == "open":
            self._open()
        elif kind == "metrics":
            self._send(item)
        elif kind == "tags":
            from mlflow.entities import RunTag

            self._mlflow_client().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in item.items()])
        elif kind == "end":
            if self.run_id is not None:
                self._stop_monitor()
                self._mlflow_client().set_terminated(self.run_id, status=item, end_time=self._last_loss_ms)

    def _mlflow_client(self):
        if self._client is None:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri())
            self._client = mlflow.tracking.MlflowClient(tracking_uri())
        return self._client

    def _open(self) -> None:
        """Create the run (each part once, so a retry after a partial failure repeats nothing), or reattach."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        client = self._mlflow_client()
        a = self._open_args
        if self.run_id is None:
            exp = mark_training_experiment(a["experiment"])
            self.run_id = self._run_created_before(client, exp)
            if self.run_id is None:
                self._create_token = self._create_token or uuid.uuid4().hex
                tags = {**a["tags"], CREATE_TAG: self._create_token}
                self.run_id = client.create_run(exp, run_name=a["run_name"], tags=tags).info.run_id
            self._delivery = Delivery(client, self.run_id, held={})  # a new run holds nothing
            self._write_run_id()
        if not self._created:
            items = list(flatten(a["params"]).items())
            for i in range(0, len(items), 100):  # the API takes at most 100 params per call
                client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in items[i : i + 100]])
            for path in a["artifacts"]:
                client.log_artifact(self.run_id, path)
            if a["dataset"]:
                d = a["dataset"]
                dataset = Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                  source=json.dumps({"uri": d["source"]}))
                client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
            self._created = True
        else:
            from mlflow.entities import RunTag

            run = client.get_run(self.run_id)
            if run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            # tags say how this start runs (the mutable flags, world size, job): rewritten at every start, as
            # config.json is; the params (the run's identity) cannot change
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in a["tags"].items()])
            for path in a["artifacts"]:  # config.json as this start wrote it
                client.log_artifact(self.run_id, path)
            # MLflow's own system/ metrics are sampled in time, not steps, and hold thousands of points after
            # days: reading their histories would slow every restart, and we never log them
            held = {}
            for key in run.data.metrics:
                if not key.startswith("system/"):
                    history = client.get_metric_history(self.run_id, key)
                    held[key] = {m.step for m in history}
                    if is_training_loss(key):
                        self._last_loss_ms = max([m.timestamp for m in history] + [self._last_loss_ms or 0]) or None
            self._delivery = Delivery(client, self.run_id, held=held)
            self._write_run_id()
        if a["system_metrics"]:
            self._start_monitor()

    def _run_created_before(self, client, experiment_id: str) -> str | None:
        """After a create_run whose answer was lost, the run it made (found by this start's token), so a
        retry does not leave an empty twin stuck in RUNNING beside the real run."""
        if self._create_token is None:
            return None
        found = client.search_runs([experiment_id], filter_string=f"tags.`{CREATE_TAG}` = '{self._create_token}'",
                                   max_results=1)
        return found[0].info.run_id if found else None

    def _write_run_id(self) -> None:
        if self.run is not None:
            self.run.write_mlflow_run_id(self.run_id)

    def _send(self, rec: dict) -> None:
        if self._delivery is None:
            raise RuntimeError("the MLflow run is not open yet")
        fresh = self._delivery.send(rec)  # each point once (npp.runtime.outbox's rule)
        if any(map(is_training_loss, fresh)):  # a training step's point (an evaluation's has none)
            self._last_loss_ms = max(rec["t"], self._last_loss_ms or 0)

    def _start_monitor(self) -> None:
        """MLflow's system metrics (CPU, memory; GPU through NVML), sampled in its own thread. It stops itself
        when the server does not answer; the sender starts it again after an outage."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._stop_monitor()
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True)
            self._monitor.start()
        except Exception as e:  # system metrics are a nicety: never a reason to stop
            self._log(f"warning: MLflow system metrics not started ({type(e).__name__}: {e})")
            self._monitor = None

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.finish()
            except Exception:
                pass


def tag_exported_model(run: RunFolder, path: str, step: int) -> None:
    """Record an export in the run's MLflow run (tags `exported_model`, `exported_step`) and as the run's logged
    model, for `npp train export` outside a training job; a tracking outage is a warning, never a failed export."""
    run_id = run.mlflow_run_id()
    if not run_id:
        return
    try:
        import mlflow
        from mlflow.entities import RunTag

        mlflow.tracking.MlflowClient(tracking_uri()).log_batch(run_id, tags=[
            RunTag("exported_model", os.path.abspath(path)), RunTag("exported_step", str(step))])
    except Exception as e:  # noqa: BLE001 - the export is written; MLflow is a record of it
        print(f"warning: MLflow at {tracking_uri()} did not take the export's tags ({type(e).__name__}); "
              f"the model is at {path}")
        return
    log_exported_model(run_id, path, step)


def log_exported_model(run_id: str, path: str, step: int) -> str | None:
    """The exported checkpoint as the run's model in MLflow 3 (the run's "Logged models", the experiment's
    Models tab, registrable): an *external* model, recorded by reference (its path, SHA-256 left out: hashing
    gigabytes is the export's job, not the record's), so MLflow copies no weights. Its params say what it is:
    step, EMA or not, parameter count, schedule. Returns the model's id, or None when MLflow did not take
    it (a warning: the file is written)."""
    try:
        import mlflow
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mapped, not read
        params = {"step": str(step), "ema": str("ema" in ckpt).lower(), "path": os.path.abspath(path),
                  "schedule": str((ckpt.get("train") or {}).get("schedule", "")),
                  "parameters": str(sum(t.numel() for t in ckpt["model"].values()))}
        mlflow.set_tracking_uri(tracking_uri())
        experiment = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id
        model = mlflow.create_external_model(name=f"model-step{step}", source_run_id=run_id, params=params,
                                             tags={"npp.exported_model": os.path.abspath(path)},
                                             model_type="npp-gpt", experiment_id=experiment)
        return model.model_id
    except Exception as e:  # noqa: BLE001 - the export is written; MLflow is a record of it
        print(f"warning: MLflow at {tracking_uri()} did not take the model record ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160] if str(e) else ''}); the model is at {path}")
        return None
