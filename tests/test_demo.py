"""A shrunken `make demo`: every stage through the same code, minutes on CPU; checks every artefact."""

import json
import os

import mlflow
import numpy as np
import pytest

from npp.app.demo import Demo, DemoConfig
from npp.models.checkpoint import load_gpt
from npp.pipeline.runs import RunFolder
from npp.pipeline.shards import load_manifest, read_meta


def _small(out):
    return DemoConfig(out=str(out), per_class=12, vq_steps=25, classifier_epochs=1, model="GPT-Nano", epochs=2,
                      global_batch=16, samples_per_class=2, eval_points=2, eval_per_class=2, check_quality=False)


@pytest.fixture(scope="module")
def quiet_demo(tmp_path_factory):
    """One shrunken demo from scratch on an otherwise idle machine (cwd: its own folder)."""
    tmp = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return tmp, Demo(_small(tmp / "demo")).run()
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_shrunken_demo_produces_consistent_artefacts(quiet_demo):
    tmp_path, result = quiet_demo
    cfg = _small(tmp_path / "demo")
    out = tmp_path / "demo"

    meta = read_meta(out / "shards")
    manifest = load_manifest(out / "shards")
    # 2% of the 120 images held out (the held-out loss), never trained on
    assert meta["complete"] and meta["samples"] == 118 and meta["val_samples"] == 2 and meta["failures"] == 0
    assert len(manifest) == meta["num_shards"] == 2 and sum(m["samples"] for m in manifest) == 118

    model, ckpt = load_gpt(out / "runs" / "npp" / "model.pt")
    assert ckpt["steps"] == 2 * (118 // 16) and ckpt["train"]["schedule"] == "4:0.25,2:0.25,1:0.5"
    assert model.config.vocab_size == 512 and model.config.grid == (8, 8)

    z = np.load(result["trained"]["samples"])
    assert z["arr_0"].shape == (20, 32, 32, 3) and np.bincount(z["labels"]).tolist() == [2] * 10

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run_id = (out / "runs" / "npp" / "mlflow_run_id").read_text()
    metrics = client.get_run(run_id).data.metrics
    for key in ("Results/loss", "Results/lr", "train_flops", "Results/fid_toynet", "is_toynet", "precision_toynet",
                "recall_toynet", "class_accuracy_toynet", "Results/val_loss_k1"):
        assert key in metrics, key
    leaves = [k.rsplit("/", 1)[-1] for k in metrics]  # MLflow titles a chart by the name after the last "/"
    assert len(leaves) == len(set(leaves)), sorted(k for k in metrics if leaves.count(k.rsplit("/", 1)[-1]) > 1)
    (curve_key,) = [k for k in metrics if k.startswith("Results/fid_toynet_n")]
    curve = [m.step for m in client.get_metric_history(run_id, curve_key)]
    assert curve == [ckpt["steps"] // 2, ckpt["steps"]]  # FID during training at epochs 1 and 2
    final = client.get_metric_history(run_id, "Results/fid_toynet")
    assert [m.step for m in final] == [ckpt["steps"]]  # the final eval
    assert not (tmp_path / "mlruns").exists() and (out / "mlartifacts").is_dir()  # artifacts stay in the demo dir
    saved = json.loads((out / "demo_result.json").read_text())
    assert saved["untrained"]["metrics"]["fid_toynet"] > 0

    # a rerun reuses the toy set, tokenizer, shards, classifier and reference
    stamp = {p: (out / p).stat().st_mtime_ns for p in ("vq_toy.pt", "toynet.pt", "ref_toynet.npz", "shards/meta.json")}
    Demo(cfg).prepare()
    assert stamp == {p: (out / p).stat().st_mtime_ns for p in stamp}


@pytest.mark.slow
def test_demo_numbers_do_not_depend_on_the_machine_being_busy(quiet_demo, tmp_path, monkeypatch):
    """A second shrunken demo from scratch beside a CPU hog (one busy process per two cores: every stage runs
    slower and unevenly across its ranks and workers, without tripling the test's time): the same metrics and loss
    curve as the quiet one."""
    import subprocess
    import sys

    quiet_dir, quiet = quiet_demo
    monkeypatch.chdir(tmp_path)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(1)]
    try:
        busy = Demo(_small(tmp_path / "busy")).run()
    finally:
        for h in hogs:
            h.kill()
    for which in ("trained", "untrained"):
        a, b = quiet[which]["metrics"], busy[which]["metrics"]
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (which, k)
    curves = []
    for d in (quiet_dir / "demo", tmp_path / "busy"):
        mlflow.set_tracking_uri(f"sqlite:///{d / 'mlflow.db'}")
        run_id = (d / "runs" / "npp" / "mlflow_run_id").read_text()
        history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "Results/loss")
        curves.append([(m.step, m.value) for m in history])
    assert curves[0] == curves[1]


@pytest.mark.slow
def test_a_demo_out_trained_with_other_settings_is_refused_before_launch_with_the_fix(quiet_demo, monkeypatch):
    """A demo_out from an earlier `npp demo` whose defaults differ: one line naming the changes and the way out,
    before torchrun starts (not the launcher's traceback and a "rerun to resume" that fails again)."""
    from dataclasses import replace

    from npp.app import demo as demo_module
    from npp.app.demo import DemoError

    tmp_path, _ = quiet_demo
    monkeypatch.chdir(tmp_path)
    cfg = replace(_small(tmp_path / "demo"), epochs=3)
    monkeypatch.setattr(demo_module, "torchrun_train_cmd", lambda *a: pytest.fail("torchrun started"))
    with pytest.raises(DemoError, match=r"--epochs: 2 at the start, 3 now.*For the demo: remove .*runs/npp"):
        Demo(cfg).train("npp", cfg.schedule)


@pytest.mark.slow
def test_demo_compare_is_the_fair_design_on_the_demos_own_runs(quiet_demo, monkeypatch, capsys):
    """`npp demo compare` after the demo: NPP reused, NTP of the same epochs trained with a branch at NPP's
    FLOPs, every end evaluated with one protocol, the held-out loss at every end, compared against annealed ends."""
    tmp_path, _ = quiet_demo
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    npp_model = (out / "runs" / "npp" / "model.pt").stat().st_mtime_ns
    result = Demo(_small(out)).compare()
    assert (out / "runs" / "npp" / "model.pt").stat().st_mtime_ns == npp_model  # make demo's run, not retrained
    fid = result["results"][0]
    assert fid["metric"] == "fid_toynet"
    groups = {(g["schedule"], g["epochs"]) for g in fid["groups"]}
    assert groups == {("1:1", "1"), ("1:1", "2"), ("4:0.25,2:0.25,1:0.5", "2")}  # the branch: NTP of 1 epoch
    assert all(g["value"]["n"] == 1 for g in fid["groups"]) and fid["not_compared"] == []
    heldout = result["results"][1]
    assert heldout["metric"] == "val/loss_k1" and len(heldout["groups"]) == 3
    branch = RunFolder(out / "runs" / "ntp-e1").read_config()["branch"]
    assert branch["parent"] == str((out / "runs" / "ntp").resolve()) and branch["epochs"] == 1
    assert "NTP (2 epochs, branches at [1] epochs)" in capsys.readouterr().out
