"""FID during training: logged at the eval points beside train_flops, without changing what training does."""

import json

import pytest

from tests.helpers import launch, read_metrics


@pytest.fixture(scope="module")
def eval_assets(shard_set, tmp_path_factory):
    from npp.eval.config import FitClassifierConfig
    from npp.eval.features import load_feature_net
    from npp.eval.fit_classifier import fit_classifier
    from npp.eval.reference import make_reference, real_images

    root = tmp_path_factory.mktemp("eval_assets")
    images = shard_set.parent / "images"
    fit_classifier(FitClassifierConfig(str(images), str(root / "toynet.pt"), epochs=2, batch=16))
    net = load_feature_net(classifier=str(root / "toynet.pt"))
    make_reference(net, real_images(str(images), None, 32)[0], str(root / "ref.npz"))
    return {"vq": str(shard_set.parent / "vq.pt"), "eval_ref": str(root / "ref.npz"),
            "classifier": str(root / "toynet.pt")}


@pytest.mark.slow
def test_eval_points_are_logged_against_flops_and_leave_training_unchanged(shard_set, tmp_path, eval_assets):
    import mlflow

    # with --ema: every rank samples the EMA, gathered from the ranks' partitions at each point
    run_args = dict(total_steps=12, log_every=4, ckpt_every=1000, schedule="2:0.5,1:0.5", ema=True, ema_decay=0.9)
    plain = tmp_path / "plain"
    launch(shard_set, plain, tmp_path, **run_args)
    evald = tmp_path / "evald"
    log = launch(shard_set, evald, tmp_path, eval_every=5, eval_per_class=2, eval_batch=8, **eval_assets, **run_args)
    assert [r["loss"] for r in read_metrics(evald)] == [r["loss"] for r in read_metrics(plain)]  # bit-equal
    assert log.count("eval at step") == 3  # steps 5, 10 and the last, 12
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    run_id = (evald / "mlflow_run_id").read_text()
    fid = client.get_metric_history(run_id, "Results/fid_toynet_n20")
    assert [m.step for m in fid] == [5, 10, 12]
    flops = {m.step: m.value for m in client.get_metric_history(run_id, "train_flops")}
    assert flops[5] < flops[10] < flops[12]
    for key in ("curve/is_toynet_n20", "curve/class_accuracy_toynet_n20", "diag/eval_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [5, 10, 12], key


@pytest.mark.slow
def test_a_training_run_as_the_mlflow_server_shows_it(shard_set, tmp_path, eval_assets, mlflow_server, monkeypatch):
    """Through MLflow's REST API, what the UI shows: a training experiment, the shard set as dataset input, the
    columns that say what the run is, the metric names (results first, diagnostics under diag/), FID against
    train_flops, system metrics, the exported model as the run's logged model, and a Duration that is the
    training's: the evaluation after the last step, and a later start with nothing left to train, do not
    stretch it."""
    from tests.helpers import launch_cmd, run_env

    env = {**run_env(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server.url,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
    run = tmp_path / "run"
    import subprocess

    proc = subprocess.run(launch_cmd(shard_set, run, total_steps=12, log_every=4, ckpt_every=1000, eval_every=6,
                                     eval_per_class=2, eval_batch=8, **eval_assets),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exp = mlflow_server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="npp")["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}["mlflow.experimentKind"] == "custom_model_development"
    run_id = (run / "mlflow_run_id").read_text()
    got = mlflow_server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    datasets = got["inputs"]["dataset_inputs"]
    assert len(datasets) == 1 and datasets[0]["dataset"]["name"] == shard_set.name and datasets[0]["dataset"]["digest"]
    keys = {m["key"] for m in got["data"]["metrics"]}
    assert {"Results/fid_toynet_n20", "train_flops", "Results/loss"} <= keys  # an eval point's FID: 20 samples
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)
    hist = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="Results/fid_toynet_n20")
    assert sorted(m["step"] for m in hist["metrics"]) == [6, 12]
    fid_at = {m["step"]: m["timestamp"] for m in hist["metrics"]}
    params = {p["key"]: p["value"] for p in got["data"]["params"]}
    assert {k: params[k] for k in ("model", "schedule", "seed")} == {"model": "GPT-Nano", "schedule": "4:0.25,2:0.25,"
                                                                     "1:0.5", "seed": "0"}
    assert int(params["parameters"]) > 0 and params["global_batch"] == "16"
    assert {"loss/k2", "loss/k1", "Results/lr", "train_pflops", "train_hours", "diag/ckpt_s", "diag/log_s"} <= keys
    assert not {"ckpt_s", "log_s", "bad_steps"} & keys
    models = mlflow_server.post("/api/2.0/mlflow/logged-models/search",
                                {"experiment_ids": [exp["experiment_id"]]})["models"]
    assert [(m["info"]["source_run_id"], {p["key"]: p["value"] for p in m["data"]["params"]}["step"])
            for m in models] == [(run_id, "12")]
    # Duration: the run ends at its last training step's point; the evaluation at step 12 came after it
    loss = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="Results/loss")["metrics"]
    hours = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train_hours")
    assert [m["step"] for m in hours["metrics"]] == [4, 8, 12]
    assert 0 < hours["metrics"][0]["value"] < hours["metrics"][-1]["value"] < 1
    end = int(got["info"]["end_time"])
    assert end == max(m["timestamp"] for m in loss) < fid_at[12], (end, fid_at)
    # a later start of the finished run (as a rerun of the same command does) leaves its end where it was
    from npp.pipeline.runs import RunFolder
    from npp.train.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    again = Tracker(True, RunFolder(run))
    again.start("npp", got["info"]["run_name"], run_id, params={}, tags={}, artifacts=[], system_metrics=False,
                resume_step=12)
    assert again.finish(wait_s=60)
    info = mlflow_server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["info"]
    assert info["status"] == "FINISHED" and int(info["end_time"]) == end


@pytest.mark.slow
def test_eval_watch_evaluates_each_checkpoint_once_into_the_training_run(shard_set, tmp_path, eval_assets):
    import subprocess
    import sys

    import mlflow

    from tests.helpers import run_env

    run = tmp_path / "run"
    launch(shard_set, run, tmp_path, total_steps=12, log_every=4, ckpt_every=4, keep=3)
    cmd = [sys.executable, "-m", "npp", "eval", "watch", "--run", str(run), "--vq", eval_assets["vq"], "--ref",
           eval_assets["eval_ref"], "--classifier", eval_assets["classifier"], "--per-class", "2", "--batch", "8",
           "--once"]
    env = run_env(tmp_path)
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("eval watch step_") == 3
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # resumable: nothing new
    assert again.returncode == 0 and "eval watch step_" not in again.stdout
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.tracking.MlflowClient()
    run_id = (run / "mlflow_run_id").read_text()
    assert [m.step for m in client.get_metric_history(run_id, "Results/fid_toynet_n20")] == [4, 8, 12]
    protocol = json.loads(client.get_run(run_id).data.tags["npp.protocol.curve/fid_toynet_n20"])
    assert protocol["per_class"] == 2 and protocol["feature_net"] == "toynet"  # compared like with like
    flops = {m.step: m.value for m in client.get_metric_history(run_id, "train_flops")}
    assert flops[4] < flops[8] < flops[12]
    kept = [json.loads(line) for line in (run / "eval_watch.jsonl").read_text().splitlines()]  # its outbox
    assert [(r["checkpoint"], r["step"]) for r in kept] == [(f"step_{s:09d}", s) for s in (4, 8, 12)]


def test_eval_points_sample_a_bf16_copy_on_cuda_refreshed_in_place():
    """On CUDA the eval sampler reads a bf16 copy of the weights (as `npp sample` samples by default; half the KV
    cache), the same object at every point, so a graph-captured sampler over it is kept; on CPU the model itself."""
    import torch

    from npp.eval.during_training import SamplingCopy
    from tests.helpers import make_gpt

    model = make_gpt()
    assert SamplingCopy()(model, torch.device("cpu")) is model
    holder = SamplingCopy("bf16")
    first = holder(model, torch.device("cpu"))
    assert first is not model and {p.dtype for p in first.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trained weights are left as they are
    with torch.no_grad():
        model.output.weight.add_(1.0)  # the next eval point's weights
    again = holder(model, torch.device("cpu"))
    assert again is first and torch.equal(again.output.weight, model.output.weight.to(torch.bfloat16))
