import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from npp.errors import UsageError
from npp.models.checkpoint import load_gpt
from npp.models.generate import generate
from npp.pipeline.shards import load_manifest
from npp.pipeline.stream import parse_shard
from npp.train.config import TrainConfig
from npp.train.ds_config import DeepSpeedConfigError
from npp.train.plan import make_plan
from npp.train.trainer import Trainer, TrainingError
from tests.helpers import launch


def metrics(run):
    """The last record of every step (a resumed run appends the steps it redoes)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def eval_loss(model, shards, n=64):
    data = parse_shard((shards / "train-000000.tar").read_bytes()) + parse_shard(
        (shards / "train-000001.tar").read_bytes()
    )
    codes = torch.stack([torch.from_numpy(c[0].astype("int64")).flatten() for _, c, _ in data[:n]])
    labels = torch.tensor([lab for _, _, lab in data[:n]])
    with torch.no_grad():
        return model.eval()(codes, labels, targets=codes, patch=1)[1].item()


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_deepspeed_run_lowers_loss_switches_k_and_exports(shard_set, tmp_path, ds):
    run = tmp_path / "run"
    ds_path = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", f"{ds}.json")
    log = launch(shard_set, run, tmp_path, ds_config=ds_path, total_steps=24)
    m = metrics(run)
    # 4:0.25,2:0.25,1:0.5 over 24 steps: k=4 for steps 1-6, k=2 for 7-12, k=1 for 13-24
    assert [m[s]["patch_side"] for s in range(1, 25)] == [4] * 6 + [2] * 6 + [1] * 12
    assert "stage 1: patch side k=2 for steps [6, 12)" in log
    model, ckpt = load_gpt(run / "model.pt")
    assert ckpt["steps"] == 24 and ckpt["config"]["grid"] == [8, 8]
    untrained = eval_loss(type(model)(model.config), shard_set)  # zero head: ln(64)
    trained = eval_loss(model, shard_set)
    assert untrained == pytest.approx(4.1589, abs=1e-3)
    assert trained < untrained - 0.3, (trained, untrained)
    tokens = generate(model, torch.tensor([0, 3]), cfg_scale=2.0, seed=0)
    assert tokens.shape == (2, 8, 8) and int(tokens.max()) < 64
    # MLflow has the run, its params and the curves
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    r = client.get_run((run / "mlflow_run_id").read_text())
    assert r.data.params["train.model"] == "GPT-Nano" and r.data.tags["world_size"] == "2"
    assert [h.value for h in client.get_metric_history(r.info.run_id, "patch_side")] == [4, 2, 2, 1, 1, 1]
    history = client.get_metric_history(r.info.run_id, "Results/loss")
    assert [h.step for h in history] == [4, 8, 12, 16, 20, 24]
    assert client.get_metric_history(r.info.run_id, "train_flops")[-1].value > 0
    # as the UI shows it: a name and columns saying what the run is, the loss per patch side as three series,
    # FLOPs on a readable axis, diagnostics apart
    assert r.info.run_name == "GPT-Nano NPP 4:0.25 2:0.25 1:0.5 24 steps s0"
    assert {k: r.data.params[k] for k in ("model", "seed", "global_batch")} == {
        "model": "GPT-Nano", "seed": "0", "global_batch": r.data.params["train.global_batch"]}
    assert {k: [h.step for h in client.get_metric_history(r.info.run_id, f"loss/k{k}")] for k in (4, 2, 1)} == {
        4: [4], 2: [8, 12], 1: [16, 20, 24]}
    pflops = client.get_metric_history(r.info.run_id, "train_pflops")[-1].value
    assert pflops * 1e15 == pytest.approx(client.get_metric_history(r.info.run_id, "train_flops")[-1].value)
    metric_keys = set(r.data.metrics)
    assert {"diag/ckpt_s", "diag/bad_steps", "diag/corrupt_shards", "diag/exported_step"} <= metric_keys
    assert not {"ckpt_s", "bad_steps", "corrupt_shards", "exported_step"} & metric_keys
    # the results open the charts: MLflow sorts its sections by prefix (code points) and puts unprefixed last
    assert {"Results/loss", "Results/lr"} <= metric_keys and not {"loss", "lr"} & metric_keys
    assert sorted({k.split("/")[0] for k in metric_keys if "/" in k})[0] == "Results"
    # the exported model as the run's logged model, by reference (no weights copied into MLflow)
    models = client.search_logged_models(experiment_ids=[r.info.experiment_id])
    assert [(m.source_run_id, m.params["step"], m.params["path"]) for m in models] == [
        (r.info.run_id, "24", r.data.tags["exported_model"])]
    assert int(models[0].params["parameters"]) == sum(t.numel() for t in model.state_dict().values())


@pytest.mark.slow
def test_corrupt_shards_are_survived_and_counted_over_all_ranks(shard_set, tmp_path):
    import re

    import mlflow

    shards = tmp_path / "shards"
    shutil.copytree(shard_set, shards)
    for name in ("train-000003.tar", "train-000006.tar"):
        data = bytearray((shards / name).read_bytes())
        data[1024 + 50 : 1024 + 60] = b"\xff" * 10
        (shards / name).write_bytes(bytes(data))
    run = tmp_path / "run"
    # 13 steps of 5 per data epoch end mid-epoch, with the loader's prefetched batches past a corrupt shard
    log = launch(shards, run, tmp_path, nproc=2, total_steps=13, ckpt_every=100, log_every=13)
    assert max(metrics(run)) == 13
    said = [line for line in log.splitlines() if "corrupt shard" in line]  # every warning, in any form
    warned = [int(r) for r in re.findall(r"rank (\d): warning: skipped corrupt shard \S+train-00000[36]\.tar", log)]
    assert set(warned) == {0, 1}, said  # both ranks met a corrupt shard
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    logged = mlflow.tracking.MlflowClient().get_metric_history((run / "mlflow_run_id").read_text(),
                                                           "diag/corrupt_shards")
    assert logged[-1].value == len(said) == len(warned) >= 3, said


def _cfg(shards, out, **kw):
    return TrainConfig(shards=str(shards), out=str(out), model="GPT-Nano", global_batch=16, total_steps=8, **kw)


@pytest.fixture
def single_rank(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


def test_clear_errors_before_any_process_group(shard_set, tmp_path, monkeypatch, single_rank):
    from npp.pipeline.shards import ShardSetError

    with pytest.raises(ShardSetError, match="no meta.json"):
        Trainer(make_plan(_cfg(tmp_path / "nowhere", tmp_path / "r")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="bad.json is not valid JSON"):
        Trainer(make_plan(_cfg(shard_set, tmp_path / "r", ds_config=str(bad))))
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        Trainer(make_plan(_cfg(shard_set, tmp_path / "r", ds_config=str(tmp_path / "missing.json"))))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DeepSpeedConfigError, match="does not divide by world size 3"):
        Trainer(make_plan(_cfg(shard_set, tmp_path / "r", ds_config="ds_configs/zero2.json")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UsageError, match="--precision must be one of auto, bf16-mixed, bf16, fp32"):
        Trainer(make_plan(_cfg(shard_set, tmp_path / "r", ds_config="ds_configs/zero2.json", precision="fp16")))
    with pytest.raises(ValueError, match="does not divide the 8x8"):
        Trainer(make_plan(_cfg(shard_set, tmp_path / "r", ds_config="ds_configs/zero2.json", schedule="3:0.5,1:0.5")))


@pytest.mark.parametrize("zero,bf16,precision,message", [
    ({"stage": 0}, {}, "fp32", "ZeRO stage 0 with fp32 weights would apply non-finite gradients"),
    ({"stage": 0}, {}, "bf16-mixed", "ZeRO stage 0 with bf16-mixed weights"),
    # DeepSpeed 0.19 raises NotImplementedError after start-up for bf16 weights + fp32 grad accumulation
    ({"stage": 0}, {}, "bf16", "ZeRO stage 0 with bf16 weights with fp32 gradient accumulation are not supported"),
    ({"stage": 2, "compute_grad_norm": False}, {}, "fp32", "compute_grad_norm=false turns off"),
    ({"stage": 1}, {"check_grad_overflow": False}, "bf16", "check_grad_overflow=false turns off"),
])
def test_configs_that_would_apply_non_finite_gradients_are_refused(tmp_path, zero, bf16, precision, message):
    """The trainer leaves the skip of a non-finite step to DeepSpeed (npp.train.bad_steps): where DeepSpeed would
    step anyway, the run is refused before any work."""
    from npp.train.ds_config import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero, "bf16": bf16}))
    cfg = _cfg(tmp_path, tmp_path / "r", ds_config=str(path), precision=precision)
    with pytest.raises(DeepSpeedConfigError, match=message):
        build_ds_config(cfg, 1, cuda=False, precision=precision)


@pytest.mark.parametrize("flag", ["sync_every", "log_every", "ckpt_every", "grad_accum", "max_bad_steps", "keep"])
def test_step_counts_below_one_are_refused(shard_set, tmp_path, single_rank, flag):
    with pytest.raises(UsageError, match=f"--{flag.replace('_', '-')} must be at least 1, got 0"):
        Trainer(make_plan(_cfg(shard_set, tmp_path / "r", ds_config="ds_configs/zero2.json", **{flag: 0})))


def test_shards_must_match_the_model(shard_set, tmp_path, single_rank):
    run = tmp_path / "run"
    run.mkdir()
    from npp.models import gpt_config

    other = gpt_config("GPT-Nano", vocab_size=128, block_size=256, num_classes=10)
    (run / "config.json").write_text(json.dumps({"model_config": other.to_dict()}))
    with pytest.raises(TrainingError, match="codebook size 64 vs model vocab_size 128; token grid"):
        Trainer(make_plan(_cfg(shard_set, run, ds_config="ds_configs/zero2.json")))


def test_manifest_counts_drive_the_epoch(shard_set, tmp_path, single_rank):
    t = Trainer(make_plan(TrainConfig(shards=str(shard_set), out=str(tmp_path / "r"), model="GPT-Nano", global_batch=16,
                            epochs=3, ds_config="ds_configs/zero2.json", warmup_epochs=1)))
    assert sum(m["samples"] for m in load_manifest(shard_set)) == 80
    assert t.plan.steps_per_epoch == 5 and t.total_steps == 15 and t.plan.optimizer.warmup_steps == 5


def test_a_run_begun_in_data_order_1_resumes_in_it(shard_set, tmp_path, single_rank):
    """A new run takes data order 2 and --mix-shards -1 as 256; a run folder written before orders were recorded
    (config.json without `data_order`, its flags holding the old default 16) resumes in order 1, not refused; and
    with the MLflow names it began with (no `mlflow_names`: `loss`, not `Results/loss`), so its charts go on."""
    from npp.train.plan import run_files

    cfg = dict(shards=str(shard_set), out=str(tmp_path / "r"), model="GPT-Nano", global_batch=16, epochs=3,
               ds_config="ds_configs/zero2.json")
    plan = make_plan(TrainConfig(**cfg))
    assert plan.data_order == 2 and plan.feed.mix_shards == 256 and plan.mlflow_names == 2
    old = run_files(plan, {}, "0000000", "fp32")
    assert old["mlflow_names"] == 2
    del old["data_order"], old["mlflow_names"]
    old["train"]["mix_shards"] = old["identity"]["mix_shards"] = 16
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(old))
    again = make_plan(TrainConfig(**cfg))
    assert again.data_order == 1 and again.feed.mix_shards == 16 and again.mlflow_names == 1


@pytest.mark.parametrize("flags,env,message", [
    (["--model", "GPT-Huge"], {}, "--model: 'GPT-Huge' is not one of GPT-B"),
    (["--schedule", "4:0.5,2:0.5"], {}, "must be 1 so the final model predicts token by token"),
    (["--global-batch", "17"], {"WORLD_SIZE": "2", "RANK": "0"}, "does not divide by world size 2"),
])
def test_bad_runs_fail_before_anything_is_created(shard_set, tmp_path, flags, env, message):
    """One line naming the problem and the fix, exit 2, no run directory, no MLflow run."""
    run = tmp_path / "run"
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **env}
    proc = subprocess.run([sys.executable, "-m", "npp", "train", "--shards", str(shard_set), "--out", str(run),
                           "--model", "GPT-Nano", "--global-batch", "16", "--total-steps", "4", *flags],
                          env=full_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("npp: error:") and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not run.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("flags,env,message", [
    (["--log-every", "0"], {}, "--log-every must be at least 1, got 0"),
    (["--mix-shards=0"], {}, "--mix-shards must be at least 1 (or -1 for the data order's default), got 0"),
    (["--shuffle-buffer", "0"], {}, "--shuffle-buffer must be at least 1, got 0"),
    (["--compile", "maybe"], {}, "--compile: 'maybe' is not one of auto, on, off"),
    (["--precision", "fp16"], {}, "--precision: 'fp16' is not one of auto, bf16-mixed, bf16, fp32"),
    (["--schedule", "3:0.5,1:0.5"], {}, "patch side 3 does not divide the 8x8 token grid"),
    (["--global-batch", "16"], {"WORLD_SIZE": "3"}, "does not divide by world size 3"),
    (["--model", "GPT-Huge"], {}, "--model: 'GPT-Huge' is not one of GPT-B"),
    (["--ds-config", "nowhere.json"], {}, "DeepSpeed config nowhere.json does not exist"),
    (["--ema", "--ds-config", "ds_configs/zero3.json"], {}, "--ema with ZeRO-3 is not supported"),
    (["--eval-every", "5"], {}, "--eval-every: evaluating needs --vq"),
])
def test_train_flags_are_refused_before_torch_is_imported(shard_set, tmp_path, flags, env, message):
    """As tokenize's: the refusal comes from the flags alone, before torch or DeepSpeed is imported."""
    code = ("import sys\nfrom npp.app.cli import main\n"
            f"try:\n    main(['train', '--shards', {str(shard_set)!r}, '--out', 'run', '--model', 'GPT-Nano', "
            f"*{flags!r}])\n"
            "except SystemExit as e:\n    assert e.code == 2, e.code\nelse:\n    raise AssertionError('accepted')\n"
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'imported before the refusal'\n")
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    for key in ("RANK", "WORLD_SIZE"):
        env.setdefault(key, "0" if key == "RANK" else "1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                          env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("npp: error:") and message in proc.stderr and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert not os.path.exists(os.path.join(repo, "run"))


def test_unfinalized_shard_set_is_a_one_line_error(shard_set, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(shard_set, partial)
    meta = json.loads((partial / "meta.json").read_text())
    (partial / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    proc = subprocess.run([sys.executable, "-m", "npp", "train", "--shards", str(partial), "--out",
                           str(tmp_path / "run"), "--model", "GPT-Nano"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not finalized: run `npp tokenize finalize" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
