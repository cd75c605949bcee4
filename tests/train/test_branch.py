"""Compute-matched NTP baselines by branching: the shorter run's decay trained from the longer run's checkpoint
is the shorter run trained from scratch, bit for bit (2 ranks, dropout on); and the held-out loss every run
logs at its end, the same for both, recomputed here from the exported model."""

import json
import subprocess

import pytest
import torch

from npp.app.launch import torchrun_train_cmd
from npp.errors import ConfigError, UsageError
from npp.pipeline.runs import RunFolder, tag_for
from npp.train.checkpointing import prune
from npp.train.schedule import PatchSchedule, branch_points, branch_step, parse_schedule
from tests.helpers import launch, read_metrics, run_env, train_args

NTP = dict(schedule="1:1", total_steps=None, global_batch=16, ckpt_every=4, log_every=4, keep=2)


def test_branch_step_is_where_the_shorter_runs_lr_leaves_the_longer_runs():
    stages = parse_schedule("1:1")
    for epochs, spe, warmup, ratio in ((16, 7, 3, 0.2), (4, 5, 2, 0.2), (10, 313, 78, 0.2), (3, 5, 0, 0.0)):
        step = branch_step(epochs, spe, warmup, ratio)
        short, long = PatchSchedule(stages, epochs * spe), PatchSchedule(stages, 4 * epochs * spe)
        lr = [(short.lr_at(t, 1.0, 0.01, warmup, ratio), long.lr_at(t, 1.0, 0.01, warmup, ratio))
              for t in range(epochs * spe)]
        differ = next((t for t, (a, b) in enumerate(lr) if a != b), epochs * spe)
        assert step <= differ <= step + 1, (epochs, step, differ)  # at the decay's first step the rate is still peak


@pytest.mark.parametrize("schedule, branch, match", [
    ("2:0.5,1:0.5", [8], "single-stage"),
    ("1:1", [20], "between 1 and 19"),
    ("1:1", [0], "between 1 and 19"),
])
def test_a_branch_point_off_the_constant_part_is_refused(schedule, branch, match):
    with pytest.raises(ConfigError, match=match):
        branch_points(parse_schedule(schedule), 20, 10, 5, 0.2, branch)


def test_a_branch_point_inside_the_shorter_runs_warmup_is_refused():
    # 2 epochs of 10 steps decay from step 16, but a 30-step warmup does not fit them: the short run warms up less
    with pytest.raises(ConfigError, match="before its warmup"):
        branch_points(parse_schedule("1:1"), 20, 10, 30, 0.2, [2])
    assert branch_points(parse_schedule("1:1"), 20, 10, 5, 0.2, [2, 16]) == {2: 16, 16: 128}


def test_prune_keeps_the_branch_points_beyond_keep(tmp_path):
    run = RunFolder(tmp_path)
    for step in (4, 8, 12, 16, 20):
        run.tag_dir(tag_for(step)).mkdir(parents=True)
    run.set_latest(tag_for(20))
    prune(run, 2, frozenset({tag_for(8)}))
    assert run.tags() == [tag_for(8), tag_for(16), tag_for(20)]


def test_branch_epochs_refused_with_a_step_budget_or_a_passed_point(shard_set, tmp_path):
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan

    args = {k: v for k, v in train_args(str(shard_set), str(tmp_path / "r"), **NTP).items()}
    with pytest.raises(UsageError, match="epoch budget"):
        make_plan(TrainConfig(**{**args, "epochs": 5, "total_steps": 20, "branch_epochs": "4"}), 1)
    with pytest.raises(UsageError, match="'x' is not a whole number"):
        make_plan(TrainConfig(**{**args, "epochs": 5, "branch_epochs": "4,x"}), 1)
    run = RunFolder(tmp_path / "r")  # a run at step 20 that kept no checkpoint at the 4-epoch point (16)
    run.tag_dir(tag_for(20)).mkdir(parents=True)
    (run.rng_file(tag_for(20), 0)).write_bytes(b"")  # saved by one rank
    run.set_latest(tag_for(20))
    with pytest.raises(UsageError, match="behind this run"):
        make_plan(TrainConfig(**{**args, "epochs": 5, "branch_epochs": "4"}), 1)


def _branch_cmd(parent, out, epochs, nproc=2, **flags):
    return torchrun_train_cmd(nproc, {"from": parent, "epochs": epochs, "out": out, **flags}, ("train", "branch"))


@pytest.mark.slow
def test_a_branch_is_the_shorter_run_trained_from_scratch(heldout_shard_set, tmp_path):
    shards = heldout_shard_set  # 72 training samples: 4 steps per epoch at global batch 16
    parent, scratch, branch = tmp_path / "ntp5", tmp_path / "ntp4", tmp_path / "ntp4_branch"
    launch(shards, parent, tmp_path, **{**NTP, "epochs": 5, "branch_epochs": "4", "run_name": "ntp5"})
    launch(shards, scratch, tmp_path, **{**NTP, "epochs": 4, "run_name": "ntp4"})
    # the 4-epoch run (16 steps) decays from step 13 (the last fifth: 12.8): the parent kept that checkpoint
    # beyond --keep 2
    assert (parent / "checkpoints" / tag_for(13)).is_dir()
    assert json.loads((parent / "config.json").read_text())["branch_points"] == {"4": 13}
    proc = subprocess.run(_branch_cmd(parent, branch, 4), env=run_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "branch of" in proc.stdout and "at step 13" in proc.stdout

    mine, theirs = read_metrics(branch), read_metrics(scratch)
    assert [r["step"] for r in mine] == list(range(1, 17)) + [16]  # each step, then the held-out loss at the end
    assert mine == theirs  # every loss and learning rate, the shared prefix and the trained decay, the held-out loss
    assert mine[-1]["val/loss_k1"] == pytest.approx(_heldout_loss(branch / "model.pt", shards), rel=1e-5)
    a, b = (torch.load(p / "model.pt", map_location="cpu", weights_only=True)["model"] for p in (branch, scratch))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the final weights differ"

    import mlflow

    client = mlflow.tracking.MlflowClient(run_env(tmp_path)["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("npp").experiment_id])}
    own = runs["GPT-Nano NTP 4ep s0 (branch of ntp5)"]  # what it is, by default
    assert (own.data.params["branch_parent"], own.data.params["branch_budget_epochs"]) == ("ntp5", "4")
    assert own.info.run_id not in (runs["ntp5"].info.run_id, runs["ntp4"].info.run_id)  # a run of its own
    assert own.data.tags["npp.branch_parent"] == runs["ntp5"].info.run_id and own.data.tags["npp.branch_step"] == "13"
    assert own.data.params["train.epochs"] == "4" and own.info.status == "FINISHED"
    # its curve is the whole 4-epoch run's, and its FLOPs its budget's (the shared prefix counted)
    assert [m.step for m in client.get_metric_history(own.info.run_id, "Results/loss")] == [4, 8, 12, 16]
    assert own.data.metrics["train_flops"] == runs["ntp4"].data.metrics["train_flops"]
    assert own.data.metrics["Results/val_loss_k1"] == runs["ntp4"].data.metrics["Results/val_loss_k1"]
    assert [m.step for m in client.get_metric_history(runs["ntp5"].info.run_id, "Results/val_loss_k1")] == [20]

    # a branch at a point the parent did not keep is refused, in one line
    again = subprocess.run(_branch_cmd(parent, tmp_path / "ntp3", 3, nproc=1), env=run_env(tmp_path),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "kept no checkpoint at step 10" in again.stderr


def _heldout_loss(model_path, shards) -> float:
    """Next-token cross-entropy of the exported model on every held-out sample's first view, in one process."""
    import torch.nn.functional as F

    from npp.models.checkpoint import load_gpt
    from npp.pipeline.shards import heldout_shards, iter_tar_samples

    model, _ = load_gpt(str(model_path))
    samples = [s for row in heldout_shards(str(shards)) for s in iter_tar_samples(row["path"])]
    assert len(samples) == 8
    idx = torch.tensor([s.codes[0].reshape(-1).tolist() for s in samples])
    with torch.no_grad():
        logits, _ = model.eval()(idx, torch.tensor([s.label for s in samples]), targets=idx)
    return float(F.cross_entropy(logits.flatten(0, 1).double(), idx.flatten()))


def test_the_heldout_loss_is_every_samples_next_token_loss_at_k1_in_eval_mode(heldout_shard_set):
    """On one rank, batches that do not divide the set (padding at weight 0), a model in training mode (dropout
    on): the mean over tokens of the whole set, with dropout off and the mode put back."""
    from npp.pipeline.shards import heldout_shards
    from npp.train.heldout import HeldOutLoss
    from tests.helpers import make_gpt

    model = make_gpt(grid=(8, 8), vocab=64, num_classes=10, token_dropout_p=0.5).train()
    got, n = HeldOutLoss(heldout_shards(str(heldout_shard_set)), 0, 1, 3, torch.device("cpu"))(model)
    assert n == 8 and model.training
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "steps": 0},
               heldout_shard_set.parent / "m.pt")
    assert got == pytest.approx(_heldout_loss(heldout_shard_set.parent / "m.pt", heldout_shard_set), rel=1e-6)
