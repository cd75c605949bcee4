"""`npp compare` from a real MLflow store: NTP's annealed ends (a full run and its branches) against NPP's end,
seeds grouped, hours from step time, protocols checked, a real figure."""

import json

import mlflow
import pytest
from PIL import Image

from npp.eval.compare import compare, frontier_cost
from npp.runtime.metric_names import to_mlflow

PROTOCOL = {"per_class": 100, "labels": "balanced", "cfg_scale": 2.0, "cfg_interval": -1, "temperature": 0.6,
            "top_k": 0, "top_p": 1.0, "reference_sha256": "ab12", "feature_net": "toynet", "feature_net_sha256": "cd"}


def _run(client, exp, name, schedule, epochs, seed, curve, total, model="GPT-B", step_s=2.0, protocol=PROTOCOL,
         branch_of=None):
    """A training run as the trainer and `npp eval` log it: identity params, train_flops and step_s at log steps,
    FID (curve: {step: (PFLOPs, fid)}) and the held-out loss, the protocol tag beside the FID. Seed 1's runs
    under today's MLflow names (`Results/fid`, `Results/val_loss_k1`), the others under the names of runs begun
    before them (`fid`, `val/loss_k1`), seed 0's branches both (a branch of a run begun before: its parent's
    points under the old names, its end under the new): one comparison takes them all."""
    naming = 2 if str(seed) == "1" else 1
    last = max(curve)
    run = client.create_run(exp, run_name=name, tags={"npp.branch_parent": branch_of} if branch_of else {}).info.run_id
    for k, v in {"schedule": schedule, "total_steps": total, "train.model": model, "train.schedule": schedule,
                 "train.epochs": epochs, "train.seed": seed, "train.run_name": name, "train.lr": 1e-4}.items():
        client.log_param(run, k, v)
    if protocol is not None:
        client.set_tag(run, "npp.protocol.fid", json.dumps(protocol))
    for step, (pflops, fid) in curve.items():
        client.log_metric(run, "train_flops", pflops * 1e15, step=step)
        client.log_metric(run, "step_s", step_s, step=step)
        named = 2 if branch_of and step == last else naming
        client.log_metric(run, to_mlflow("fid", named), fid, step=step)
        client.log_metric(run, to_mlflow("val/loss_k1", named), fid / 10, step=step)
    client.set_terminated(run)
    return run


def _ntp_family(client, exp, seed, shift=0.0, step_s=3.6):
    """An NTP run of 32 epochs (mid-run FIDs at constant LR, annealed end) and its branches at 16 and 24 epochs:
    their ends are the frontier; the mid-run points of the full run are much worse than the branch ends."""
    full = _run(client, exp, f"ntp32-s{seed}", "1:1", 32, seed,
                {100: (10, 60.0 + shift), 200: (20, 40.0 + shift), 320: (32, 12.0 + shift)}, 320, step_s=step_s)
    for epochs, fid in ((16, 30.0), (24, 18.0)):
        _run(client, exp, f"ntp{epochs}-s{seed}", "1:1", epochs, seed,
             {100: (10, 60.0 + shift), 10 * epochs: (epochs, fid + shift)}, 10 * epochs, step_s=step_s,
             branch_of=full)


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("npp")
    for seed, shift in (("0", 0.0), ("1", 2.0)):
        _ntp_family(client, exp, seed, shift)
        # NPP of 32 epochs costs 18.4 PFLOPs and ends at FID 24 (+ shift): NTP's ends reach 24 between its
        # 16-epoch (30) and 24-epoch (18) branches: at 16 * (24/16)^(0.5) PFLOPs in log-FLOPs
        _run(client, exp, f"npp32-s{seed}", "4:0.25,2:0.25,1:0.5", 32, seed,
             {100: (6, 50.0 + shift), 320: (18.4, 24.0 + shift)}, 320)
    return client, exp, tmp_path


def test_the_ratio_is_taken_against_the_annealed_ends_with_seeds_grouped(store, capsys):
    client, exp, tmp_path = store
    out = compare("npp", str(tmp_path / "cmp"))
    fid = out["results"][0]
    assert fid["metric"] == "fid"
    groups = {(g["schedule"], g["epochs"]): g for g in fid["groups"]}
    assert set(groups) == {("1:1", "16"), ("1:1", "24"), ("1:1", "32"), ("4:0.25,2:0.25,1:0.5", "32")}
    npp = groups[("4:0.25,2:0.25,1:0.5", "32")]
    assert npp["value"] == {"n": 2, "mean": 25.0, "min": 24.0, "max": 26.0}  # two seeds: mean and range
    ratio = fid["ratios"][0]["pflops"]
    # the means: NPP's 25 lies between NTP's 16-epoch (31) and 24-epoch (19) ends, interpolated in log-FLOPs
    expected_ntp = 16 * (24 / 16) ** ((31 - 25) / (31 - 19))
    assert ratio["ntp_cost"] == pytest.approx(expected_ntp)
    assert ratio["ratio"] == pytest.approx(18.4 / expected_ntp)
    assert ratio["per_seed"] == {"0": pytest.approx(18.4 / (16 * 1.5 ** 0.5)),
                                 "1": pytest.approx(18.4 / (16 * 1.5 ** 0.5))}
    # NTP's mid-run point at constant LR (FID 40 at 20 PFLOPs) would have given 18.4 / 28 or so: not used
    assert ratio["ratio"] > 0.85
    # hours from step time: NPP 2 s x 320 steps, NTP 3.6 s x its steps
    assert npp["hours"]["mean"] == pytest.approx(320 * 2.0 / 3600)
    assert fid["ratios"][0]["hours"]["ratio"] == pytest.approx(
        (320 * 2.0) / (3.6 * 10 * 16 * (24 / 16) ** 0.5), rel=1e-6)
    eq = fid["equal_epochs"][0]
    assert eq["difference"] == pytest.approx(25.0 - 13.0) and eq["paired"] == {"0": 12.0, "1": 12.0}
    assert [r["metric"] for r in out["results"]] == ["fid", "val/loss_k1"]
    printed = capsys.readouterr().out
    assert "NPP/NTP FLOPs = 0.939" in printed and "equal epochs" in printed
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["results"][0]["ratios"][0]["pflops"]["ratio"] == pytest.approx(ratio["ratio"])
    png, pdf = tmp_path / "cmp" / "compare.png", tmp_path / "cmp" / "compare.pdf"
    assert pdf.read_bytes().startswith(b"%PDF") and Image.open(png).size == (2160, 720)  # two panels
    # and in MLflow, as the UI shows it: a comparison run with the figure, the table and the ratios
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.tags["npp.kind"] == "comparison" and len(run.data.tags["npp.compares"].split(",")) == 8
    assert run.data.metrics["ratio_pflops_at_fid/4x0.25_2x0.25_1x0.5_32_ep"] == pytest.approx(ratio["ratio"])
    assert {a.path for a in client.list_artifacts(out["mlflow_run_id"])} >= {"compare.png", "comparison.json"}
    again = compare("npp", str(tmp_path / "cmp"))  # the same runs: the same comparison run, not a second one
    assert again["mlflow_run_id"] == out["mlflow_run_id"]
    typed = compare("npp", str(tmp_path / "typed"), metric="Results/fid")  # the name the UI shows
    assert typed["results"][0]["metric"] == "fid" and typed["results"][0]["ratios"] == fid["ratios"]


def test_a_store_with_only_the_mid_run_curve_prints_no_ratio(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("npp")
    # the NTP run was evaluated during training only, never at its end (step 640): no annealed point
    _run(client, exp, "ntp", "1:1", 64, "0", {100: (10, 60.0), 200: (20, 30.0), 320: (32, 12.0)}, 640)
    _run(client, exp, "npp", "4:0.25,2:0.25,1:0.5", 32, "0", {320: (18.4, 24.0)}, 320)
    out = compare("npp", str(tmp_path / "cmp"))
    assert out["results"][0]["ratios"] == []
    assert "NPP/NTP" not in capsys.readouterr().out


def test_npp_beyond_the_frontier_gets_a_bound_not_a_ratio(store, capsys):
    client, exp, tmp_path = store
    _run(client, exp, "npp-great", "2:0.5,1:0.5", 32, "0", {320: (20.0, 5.0)}, 320)
    compare("npp", str(tmp_path / "cmp"), runs=["npp-great", "ntp32-s0", "ntp16-s0", "ntp24-s0"])
    printed = capsys.readouterr().out
    assert "no annealed NTP run reaches NPP's fid (NPP/NTP FLOPs < 0.625)" in printed


def test_unlike_protocols_are_named_and_not_compared(store, capsys):
    client, exp, tmp_path = store
    _run(client, exp, "npp-50", "2:0.5,1:0.5", 32, "0", {320: (20.0, 20.0)}, 320,
         protocol={**PROTOCOL, "per_class": 50})
    out = compare("npp", str(tmp_path / "cmp"), runs=["npp-50", "ntp32-s0", "ntp16-s0", "ntp24-s0"])
    assert out["results"][0]["ratios"] == []
    assert "not compared: GPT-B NPP 2:0.5,1:0.5 32 ep: measured unlike its NTP runs (per_class 50 vs 100)" in \
        capsys.readouterr().out


def test_frontier_cost_interpolates_in_log_flops_and_bounds_outside():
    pts = [(1.0, 40.0), (4.0, 20.0), (16.0, 10.0)]
    assert frontier_cost(pts, 20.0) == {"cost": 4.0}
    assert frontier_cost(pts, 30.0)["cost"] == pytest.approx(2.0)  # halfway in log between 1 and 4
    assert frontier_cost(pts, 50.0) == {"below": 1.0}
    assert frontier_cost(pts, 5.0) == {"above": 16.0}


def test_runs_can_be_picked(store):
    from npp.errors import ConfigError

    client, exp, tmp_path = store
    out = compare("npp", str(tmp_path / "picked"), runs=["npp32-s0", "ntp16-s0"])
    assert {r["run"] for r in out["runs"]} == {"npp32-s0", "ntp16-s0"}
    with pytest.raises(ConfigError, match="--runs nope: no such training run"):
        compare("npp", str(tmp_path / "picked"), runs=["nope"])


def test_two_runs_of_the_same_flags_and_seed_are_refused_with_the_way_out(store):
    from npp.errors import ConfigError

    client, exp, tmp_path = store
    _run(client, exp, "npp32-s0-again", "4:0.25,2:0.25,1:0.5", 32, "0", {320: (18.4, 23.0)}, 320)
    with pytest.raises(ConfigError, match="'npp32-s0' and 'npp32-s0-again' are the same run.*--runs"):
        compare("npp", str(tmp_path / "cmp"))
    out = compare("npp", str(tmp_path / "cmp"), runs=["npp32-s0-again", "ntp16-s0", "ntp24-s0", "ntp32-s0"])
    assert out["results"][0]["ratios"][0]["pflops"]["ratio"] is not None
