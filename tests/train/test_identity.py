"""A run's identity is fixed at its first start: a rerun with other defining flags is refused before anything
starts; flags that may change on resume are accepted and recorded, in config.json and MLflow alike.

On 7b3cb8a a rerun of a GPT-Nano run folder with `--model GPT-L --schedule 1:1` exited 0: it resumed the
GPT-Nano weights, rewrote config.json to say GPT-L and 1:1, while MLflow kept the old values.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npp.train.config import TrainConfig
from npp.train.identity import IDENTITY, MUTABLE

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--model", "GPT-Nano", "--global-batch", "16", "--total-steps", "4", "--schedule", "2:0.5,1:0.5",
         "--log-every", "1", "--workers", "1", "--shuffle-buffer", "20"]


def test_the_defining_flags_are_declared_with_them_and_shown_in_help(capsys):
    """Which flags define a run is said once, on the flag (`identity=True`); the set is what the method needs
    fixed (what is trained and how, the data order, the seed, the MLflow run), and `--help` says so."""
    from npp.app.cli import main

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(IDENTITY) | set(MUTABLE) == fields and not set(IDENTITY) & set(MUTABLE)
    assert set(IDENTITY) == {
        "model", "schedule", "patch_levels", "epoch_rate", "epochs", "total_steps", "global_batch", "lr", "end_lr",
        "warmup_epochs", "decay_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "precision", "ema",
        "ema_decay", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout", "drop_path", "class_dropout",
        "seed", "shuffle_buffer", "mix_shards", "experiment", "run_name"}
    main(["train", "--help"])
    page = " ".join(capsys.readouterr().out.split())
    assert page.count("defines the run: fixed at its first start") == len(IDENTITY)


def npp_train(*args, tmp_path, check_torch=True):
    code = ("import sys\nfrom npp.app.cli import main\ncode = 0\n"
            f"try:\n    main(['train', *{list(args)!r}])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\nsys.exit(code or 0)\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def started(shard_set, tmp_path_factory):
    """A GPT-Nano NPP run trained to its end (4 steps) with MLflow tracking, as `npp train` starts one."""
    tmp = tmp_path_factory.mktemp("identity")
    run = tmp / "run"
    proc = npp_train("--shards", str(shard_set), "--out", str(run), *FLAGS, tmp_path=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return tmp, run


def _mlflow_run(tmp, run):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    return client.get_run((run / "mlflow_run_id").read_text().strip())


def test_a_rerun_that_changes_what_the_run_is_is_refused_naming_each_change(started, shard_set):
    tmp, run = started
    before = (run / "config.json").read_bytes()
    changed = [*FLAGS, "--model", "GPT-Mini", "--schedule", "1:1", "--lr", "3e-4"]
    proc = npp_train("--shards", str(shard_set), "--out", str(run), *changed, tmp_path=tmp)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "--model: 'GPT-Nano' at the start, 'GPT-Mini' now" in err
    assert "--schedule: '2:0.5,1:0.5' at the start, '1:1' now" in err
    assert "--lr: 0.0001 at the start, 0.0003 now" in err
    assert "rerun with the same flags to resume it, or pass a new --out" in err
    assert "NO-TORCH" in proc.stdout  # refused before torch, and nothing was touched
    assert (run / "config.json").read_bytes() == before
    # a run folder from before identities were recorded: its saved flags stand in
    legacy = tmp / "legacy"
    shutil.copytree(run, legacy)
    saved = json.loads((legacy / "config.json").read_text())
    del saved["identity"]
    (legacy / "config.json").write_text(json.dumps(saved))
    proc = npp_train("--shards", str(shard_set), "--out", str(legacy), *FLAGS[:-6], "--ema", tmp_path=tmp)
    assert proc.returncode == 2 and "--ema: False at the start, True now" in proc.stderr, proc.stderr
    # the check on a login node says the same
    proc = npp_train("check", "--shards", str(shard_set), "--out", str(run), *changed, tmp_path=tmp)
    assert proc.returncode == 2 and "--model: 'GPT-Nano' at the start, 'GPT-Mini' now" in proc.stderr


def test_other_data_is_another_run(started, shard_set, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp, run = started
    other = tmp_path / "other"
    shutil.copytree(shard_set, other)
    table = pq.read_table(other / "manifest.parquet").to_pylist()
    table[0]["sha256"] = "0" * 64  # another shard's content
    pq.write_table(pa.Table.from_pylist(table), other / "manifest.parquet")
    proc = npp_train("--shards", str(other), "--out", str(run), *FLAGS, tmp_path=tmp)
    assert proc.returncode == 2 and "the shard set's content: " in proc.stderr, proc.stderr


def test_flags_that_may_change_are_accepted_and_recorded_in_config_and_mlflow(started, shard_set):
    tmp, run = started
    first = _mlflow_run(tmp, run)
    assert first.data.tags["flag.log_every"] == "1" and first.data.params["train.model"] == "GPT-Nano"
    assert "train.log_every" not in first.data.params  # params hold the identity only: they cannot change
    moved = tmp / "moved-shards"  # the data moved: same content, another path
    shutil.copytree(shard_set, moved)
    flags = [f if f != "1" or FLAGS[i - 1] != "--log-every" else "2" for i, f in enumerate(FLAGS)]
    proc = npp_train("--shards", str(moved), "--out", str(run), *flags, "--keep", "2", tmp_path=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "flags changed since the last start (allowed on resume): " in proc.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["log_every"] == 2 and config["train"]["keep"] == 2
    assert config["identity"]["model"] == "GPT-Nano" and config["train"]["model"] == "GPT-Nano"
    changed = config["starts"][-1]["changed"]
    assert changed["log_every"] == {"was": 1, "now": 2} and changed["keep"] == {"was": 3, "now": 2}
    assert changed["shards"]["now"] == str(moved) and len(config["starts"]) == 2
    now = _mlflow_run(tmp, run)
    assert now.data.tags["flag.log_every"] == "2" and now.data.tags["flag.keep"] == "2"
    assert now.data.params == first.data.params  # MLflow and config.json agree: identity unchanged, tags current
    # MLflow's own source tags (the UI's Source and Version columns) and the exported model, where MLflow shows it
    assert now.data.tags["mlflow.source.git.commit"] == config["git_commit"] != ""
    assert now.data.tags["mlflow.source.name"] == "npp train"
    assert now.data.tags["exported_model"] == str((run / "export" / "model_step_000000004.pt").resolve())
    for k, v in config["identity"].items():
        if k in IDENTITY:
            assert now.data.params[f"train.{k}"] == str(v)


def test_a_defining_flag_changed_on_purpose_is_recorded_as_an_amendment(started, shard_set):
    tmp, run = started
    first = _mlflow_run(tmp, run)
    proc = npp_train("--shards", str(shard_set), "--out", str(run), *FLAGS, "--lr", "5e-5", "--allow-change", "lr",
                     tmp_path=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["identity"]["lr"] == 5e-5 and config["first_identity"]["lr"] == 1e-4
    assert config["starts"][-1]["amended"] == {"lr": {"was": 1e-4, "now": 5e-5}}
    now = _mlflow_run(tmp, run)
    assert now.data.params == first.data.params and now.data.params["train.lr"] == "0.0001"
    assert now.data.tags["amended.lr"].startswith("0.0001 -> 5e-05 from step_")
    # the next start compares with the amended identity; --allow-change names defining flags only
    proc = npp_train("check", "--shards", str(shard_set), "--out", str(run), *FLAGS, "--lr", "5e-5", tmp_path=tmp)
    assert proc.returncode == 0, proc.stderr
    proc = npp_train("check", "--shards", str(shard_set), "--out", str(run), *FLAGS, "--allow-change", "workers",
                     tmp_path=tmp)
    assert proc.returncode == 2 and "--allow-change workers: not a defining flag" in proc.stderr, proc.stderr
