"""`npp compare runs`: the jobs of the fair experiment, their order and, under SLURM, their dependencies (a stub
`sbatch` records each submission). The local path runs for real in tests/test_demo.py (`npp demo compare`)."""

import json
import os
import sys

import pytest

from npp.app.experiment import CompareRunsConfig, Experiment, default_branches
from npp.errors import UsageError

SBATCH = f"""#!{sys.executable}
import json, os, pathlib, sys
log = pathlib.Path(os.environ["SBATCH_LOG"])
n = str(100 + len(list(log.iterdir())))
env = {{k: os.environ.get(k, "") for k in ("TRAIN_ARGS", "TRAIN_COMMAND", "SAMPLE_ARGS", "EVAL_ARGS")}}
(log / (n + ".json")).write_text(json.dumps({{"argv": sys.argv[1:], "id": n, **env}}))
print(n)
"""


@pytest.fixture
def files(tmp_path):
    for name in ("vq.pt", "ref.npz", "toynet.pt"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def _cfg(files, **kw):
    return CompareRunsConfig(shards=str(files / "shards"), vq=str(files / "vq.pt"), ref=str(files / "ref.npz"),
                             classifier=str(files / "toynet.pt"), out=str(files / "runs"), model="GPT-Nano", epochs=32,
                             **kw)


def test_default_branches_are_the_compute_matched_budgets_and_the_frontiers_shape():
    # GPT-Nano on an 8x8 grid: 4:0.25,2:0.25,1:0.5 costs 0.573 of NTP (18.3 epochs of 32), 2:0.5,1:0.5 0.63
    assert default_branches(["4:0.25,2:0.25,1:0.5", "2:0.5,1:0.5"], 32, "GPT-Nano", (8, 8)) == [8, 16, 18, 20, 24]


def test_jobs_per_seed_in_order_with_one_protocol(files):
    exp = Experiment(_cfg(files, seeds="0,1", schedules="4:0.25,2:0.25,1:0.5;2:0.5,1:0.5", branch_epochs="16,18"))
    jobs = {j.name: j for j in exp.jobs()}
    assert [n for n in jobs if jobs[n].kind == "train"] == [
        "ntp-s0", "npp-4x0.25_2x0.25_1x0.5-s0", "npp-2x0.5_1x0.5-s0",
        "ntp-s1", "npp-4x0.25_2x0.25_1x0.5-s1", "npp-2x0.5_1x0.5-s1"]
    ntp = jobs["ntp-s1"].args
    assert ntp[ntp.index("--branch-epochs") + 1] == "16,18" and ntp[ntp.index("--seed") + 1] == "1"
    assert jobs["ntp-e18-s1"].kind == "branch" and jobs["ntp-e18-s1"].after == ["ntp-s1"]
    samples = [j.args for j in jobs.values() if j.kind == "sample"]
    assert len(samples) == 10 and len({tuple(a[a.index("--per-class"):]) for a in samples}) == 1  # one protocol
    assert jobs["compare"].after == [n for n in jobs if n != "compare"]


def test_slurm_submissions_are_chained_afterok(files, tmp_path, monkeypatch, capsys):
    stub, log = tmp_path / "bin", tmp_path / "log"
    stub.mkdir(), log.mkdir()
    (stub / "sbatch").write_text(SBATCH)
    (stub / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    ids = Experiment(_cfg(files, seeds="0", branch_epochs="18", slurm=True, nproc=8, nodes=2,
                          sbatch_flags="--partition=gpu")).submit()
    subs = {p.stem: json.loads(p.read_text()) for p in log.iterdir()}
    by_name = {n: subs[i] for n, i in ids.items()}
    ntp, branch = by_name["ntp"], by_name["ntp-e18"]
    assert "--nodes=2" in ntp["argv"] and "--partition=gpu" in ntp["argv"] and ntp["TRAIN_COMMAND"] == "train"
    assert not any(a.startswith("--dependency") for a in ntp["argv"])
    assert f"--dependency=afterok:{ids['ntp']}" in branch["argv"] and branch["TRAIN_COMMAND"] == "train branch"
    assert "--from" in branch["TRAIN_ARGS"] and branch["argv"][-1].endswith("slurm/train.sbatch")
    assert f"--dependency=afterok:{ids['ntp-e18']}" in by_name["ntp-e18-eval"]["argv"]
    compare = by_name["compare"]["argv"]
    deps = next(a for a in compare if a.startswith("--dependency=afterok:")).split(":")[1:]
    assert sorted(deps) == sorted(i for n, i in ids.items() if n != "compare")  # after every other job
    assert any(a.startswith("--wrap=") and " compare --experiment npp" in a for a in compare)


def test_bad_flags_are_refused_before_any_job(files):
    with pytest.raises(UsageError, match="an NPP schedule has a coarse stage"):
        _cfg(files, schedules="1:1").validate()
    with pytest.raises(UsageError, match="--ref .* does not exist"):
        CompareRunsConfig(shards="s", vq=str(files / "vq.pt"), ref="nope.npz", classifier=str(files / "toynet.pt"),
                          model="GPT-Nano").validate()


def test_the_cli_spellings_reach_the_experiment(files):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "npp", "compare", "runs", "--shards", str(files / "shards"),
                           "--vq", str(files / "vq.pt"), "--ref", str(files / "ref.npz"), "--classifier",
                           str(files / "toynet.pt"), "--model", "GPT-Nano", "--epochs", "32", "--seeds", "0,1",
                           "--schedules", "4:0.25,2:0.25,1:0.5;2:0.5,1:0.5", "--dry-run", "--out",
                           str(files / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "branches at [8, 16, 18, 20, 24] epochs" in proc.stdout
    assert proc.stdout.count("train branch --from") == 2 * 10  # 5 branches x 2 seeds, each checked, then run
