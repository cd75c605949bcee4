"""Metric points that must reach an MLflow run exactly once, whatever the tracking server does: one outbox and
one rule of delivery for the trainer (npp.train.tracking), `npp eval watch` and `npp eval`.

The outbox is a JSON-lines file kept beside what made the points: each record {"step", "t" (ms, when the
point was made), "metrics", and optionally "tags" and "checkpoint"} is appended *before* anything is sent,
so a point computed is never lost to a server that is down, and never computed twice (an evaluation is minutes
of sampling). The file is the record of what MLflow should hold; it is replayed whole at every start.

The rule of delivery (`Delivery.send`): a metric point goes to MLflow unless the run already holds a point of
that key *at that step* (the run's history of a key is read when a step is not known to be held). Exact per step,
so an evaluation of an earlier checkpoint logged after a later one still arrives; a point sent again after its
answer was lost carries the time it was made, and MLflow's store keeps one row per (key, step, time, value),
so it is not doubled either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from npp.runtime.files import truncate_jsonl


def now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """A JSON-lines file of the points (and tags) an MLflow run should hold, in the order they were made."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def append(self, step: int, metrics: dict[str, float], tags: dict[str, str] | None = None,
               **extra) -> dict:
        """Keep a record (flushed to the file before it is sent) and return it; its time is fixed here."""
        rec = {"step": int(step), "t": now_ms(), "metrics": {k: float(v) for k, v in metrics.items()}}
        if tags:
            rec["tags"] = {k: str(v) for k, v in tags.items()}
        rec.update(extra)
        # appended and closed, not fsynced: the outbox outlives a tracking outage or a killed job; a machine that
        # crashes loses at most the last records, which the trainer redoes from its checkpoint and eval watch
        # computes again (an fsync per point would stall the training loop on a network filesystem)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec

    def records(self) -> list[dict]:
        """The whole records; a line cut by a crash mid-append is not one (its point is made again: the trainer
        redoes its step from the checkpoint, eval watch evaluates that checkpoint again)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [rec for rec in out if isinstance(rec, dict) and "step" in rec and "metrics" in rec]

    def cut_after(self, step: int) -> None:
        """Drop the records after `step` (a resume redoes those steps, and logs them again)."""
        truncate_jsonl(self.path, step)


class Delivery:
    """One MLflow run's side of the rule: which steps it holds per metric key, and sending a record's points
    that it lacks. `held`: every key's steps, already read (an empty dict for a run this process created);
    without it each key's history is read from MLflow the first time the key is sent."""

    def __init__(self, client, run_id: str, held: dict[str, set[int]] | None = None):
        self.client, self.run_id = client, run_id
        self._complete = held is not None
        self._held: dict[str, set[int]] = {k: set(v) for k, v in (held or {}).items()}

    def holds(self, key: str, step: int) -> bool:
        """Whether the run has a point of `key` at `step`. Without a complete `held`, a step not seen yet reads
        the key's history again: another writer (the trainer, for `npp eval watch`) may have logged it since."""
        steps = self._held.setdefault(key, set())
        if step not in steps and not self._complete:
            steps.update(m.step for m in self.client.get_metric_history(self.run_id, key))
        return step in steps

    def send(self, rec: dict, rename=None) -> dict[str, float]:
        """The record's points MLflow lacks, sent with the record's own time and with its tags in one request;
        returns them. A record whose points MLflow holds sends nothing, its tags included, so a replay never
        resets a tag another writer has set since. `rename`: the keys as MLflow shows them
        (npp.runtime.metric_names.for_mlflow)."""
        from mlflow.entities import Metric, RunTag

        step = int(rec["step"])
        metrics = rename(rec["metrics"]) if rename else rec["metrics"]
        fresh = {k: float(v) for k, v in metrics.items() if not self.holds(k, step)}
        t = rec.setdefault("t", now_ms())  # a record of an older npp has no time: one per point
        if fresh:
            tags = [RunTag(k, str(v)) for k, v in (rec.get("tags") or {}).items()]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, step) for k, v in fresh.items()], tags=tags)
            for k in fresh:
                self._held[k].add(step)
        return fresh
