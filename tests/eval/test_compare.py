"""`npp compare` from a real MLflow store: runs paired by model size, hours from step time, a real figure."""

import json

import mlflow
import pytest
from PIL import Image

from npp.eval.compare import compare


def _run(client, exp, name, model, schedule, fids, step_s=2.0):
    """A training run as the trainer logs it: params, train_flops and step_s at log steps, FID at eval steps."""
    run = client.create_run(exp, run_name=name).info.run_id
    client.log_param(run, "schedule", schedule)
    client.log_param(run, "train.model", model)
    for step, (pflops, fid) in fids.items():
        client.log_metric(run, "train_flops", pflops * 1e15, step=step)
        client.log_metric(run, "step_s", step_s, step=step)
        client.log_metric(run, "fid", fid, step=step)
    client.set_terminated(run)
    return run


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("npp")
    _run(client, exp, "b-ntp", "GPT-B", "1:1", {100: (10, 40.0), 200: (20, 25.0), 400: (40, 12.0)}, step_s=3.6)
    _run(client, exp, "b-npp", "GPT-B", "4:0.25,2:0.25,1:0.5", {100: (6, 35.0), 200: (12, 20.0), 400: (23, 10.0)})
    # a bigger model's NPP run ends at a FID GPT-B's NTP also reaches: sorted names or FID must not pair them
    _run(client, exp, "l-npp", "GPT-L", "4:0.25,2:0.25,1:0.5", {100: (30, 30.0), 200: (60, 9.0)})
    return tmp_path


def test_runs_are_paired_by_model_and_the_figure_is_drawn(store):
    out = store / "cmp"
    rows = compare("npp", str(out))
    ratios = json.loads((out / "cost_ratio.json").read_text())
    assert list(ratios) == ["GPT-B"]  # GPT-L has no NTP run: no ratio, and never GPT-B's NTP against GPT-L
    b = ratios["GPT-B"]
    assert (b["npp_run"], b["ntp_run"]) == ("b-npp", "b-ntp")
    assert b["npp_pflops"] == pytest.approx(20.8) and b["ratio"] == pytest.approx(20.8 / 40)
    # hours of training from step time (step_s x steps), not from the runs' timestamps
    ntp = {r["step"]: r["train_hours"] for r in rows if r["run"] == "b-ntp"}
    assert ntp == {100: pytest.approx(0.1), 200: pytest.approx(0.2), 400: pytest.approx(0.4)}
    png, pdf = out / "compare.png", out / "compare.pdf"
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5000
    width, height = Image.open(png).size
    assert (width, height) == (1080, 690)  # 7.2 x 4.6 in at 150 dpi, drawn by matplotlib


def test_runs_can_be_picked(store):
    out = store / "picked"
    rows = compare("npp", str(out), runs=["b-npp", "l-npp"])
    assert {r["run"] for r in rows} == {"b-npp", "l-npp"}
    assert not (out / "cost_ratio.json").exists()  # no NTP run among those picked
    from npp.errors import ConfigError

    with pytest.raises(ConfigError, match="--runs nope: no such training run"):
        compare("npp", str(out), runs=["nope"])
