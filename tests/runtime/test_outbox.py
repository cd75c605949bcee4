"""npp.runtime.outbox: the one outbox and rule of delivery behind the trainer's tracker, `npp eval watch` and
`npp eval` (the answer-dropping HTTP hop in tests/train/test_tracking.py takes the trainer through it)."""

import json

import pytest

from npp.runtime.outbox import Delivery, Outbox


@pytest.fixture
def store(tmp_path):
    """A real MLflow store (SQLite) and a run in it."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("outbox")
    return client, client.create_run(exp).info.run_id


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_the_outbox_keeps_records_in_order_and_is_cut_back_to_a_step(tmp_path):
    box = Outbox(tmp_path / "outbox.jsonl")
    assert box.records() == []
    for step in (1, 2, 3, 4):
        tags = {"npp.protocol": "p"} if step == 2 else None
        rec = box.append(step, {"loss": 1.0 / step}, tags, checkpoint=f"c{step}")
        assert rec["t"] > 0 and rec["checkpoint"] == f"c{step}"
    box.cut_after(2)  # a resume from step 2 redoes 3 and 4
    assert [(r["step"], r.get("tags")) for r in box.records()] == [(1, None), (2, {"npp.protocol": "p"})]
    with open(box.path, "a") as fh:
        fh.write('{"step": 3, "t"' + "\0" * 8)  # a line cut by a crash mid-append
    assert [r["step"] for r in box.records()] == [1, 2]  # not a record: its point is made again


def test_each_point_once_at_its_own_step_across_processes(tmp_path, store):
    """A point is sent unless the run holds that key at that step: an earlier step after a later one arrives (a
    rule of "nothing at or below the newest step" would drop it), a record sent again adds nothing, and a new
    process (a Delivery that reads the history) sends nothing twice; a record's tags go with its points, so a
    replay does not reset a tag set since."""
    client, run_id = store
    box = Outbox(tmp_path / "outbox.jsonl")
    first = Delivery(client, run_id)
    for step in (6, 4):
        assert first.send(box.append(step, {"fid": float(step)}, {"npp.protocol.fid": "p"})) == {"fid": float(step)}
    assert first.send(box.records()[0]) == {}
    assert _steps(client, run_id, "fid") == [4, 6]
    again = Delivery(client, run_id)  # the next start replays the whole outbox
    assert [again.send(rec) for rec in box.records()] == [{}, {}]
    assert _steps(client, run_id, "fid") == [4, 6]
    assert client.get_run(run_id).data.tags["npp.protocol.fid"] == "p"
    client.set_tag(run_id, "npp.protocol.fid", "q")  # `npp eval` logged a FID with another protocol since
    assert [Delivery(client, run_id).send(rec) for rec in box.records()] == [{}, {}]  # a later start's replay
    assert client.get_run(run_id).data.tags["npp.protocol.fid"] == "q"
    client.log_metric(run_id, "fid", 8.0, step=8)  # another writer (the trainer, beside eval watch), meanwhile
    assert again.send({"step": 8, "metrics": {"fid": 8.0}}) == {}
    assert _steps(client, run_id, "fid") == [4, 6, 8]
    renamed = Delivery(client, run_id, held={})  # a run created here: nothing is read from MLflow
    results = lambda metrics: {f"Results/{k}": v for k, v in metrics.items()}  # noqa: E731
    assert renamed.send({"step": 4, "metrics": {"fid": 4.0}}, rename=results) == {"Results/fid": 4.0}
    assert _steps(client, run_id, "Results/fid") == [4]


def test_eval_watch_takes_over_the_state_an_earlier_npp_kept(tmp_path):
    """`npp eval watch` before the outbox kept {"done", "pending"} in RUN/eval_watch.json: its evaluated tags are
    not evaluated again and its pending metrics are sent from the outbox."""
    from npp.eval.watch import _take_over_the_state_before
    from npp.pipeline.runs import RunFolder

    run = RunFolder(tmp_path)
    run.eval_watch_before.write_text(json.dumps({
        "done": ["step_000000004"],
        "pending": {"step_000000008": {"step": 8, "metrics": {"fid": 3.0}, "tags": {"npp.protocol.fid": "p"}}}}))
    box = Outbox(run.eval_watch)
    _take_over_the_state_before(run, box)
    assert [(r["checkpoint"], r["step"], r["metrics"], r.get("tags")) for r in box.records()] == [
        ("step_000000004", 4, {}, None), ("step_000000008", 8, {"fid": 3.0}, {"npp.protocol.fid": "p"})]
    assert not run.eval_watch_before.exists()
    _take_over_the_state_before(run, box)  # once
    assert len(box.records()) == 2
