"""The small contract modules the trainer leans on, each on its own: when the loop syncs, evaluates and saves
(cadence), how non-finite steps are bounded (bad_steps), what a run is called and shows in MLflow (run_record),
which checkpoints a run folder holds (RunFolder), and how a record file is written and cut back (files)."""

import json
import os

import pytest

from npp.pipeline.runs import RunFolder, tag_for, tag_step
from npp.runtime.files import atomic_path, atomic_symlink, atomic_write_text, staged_dir, truncate_jsonl
from npp.runtime.metric_names import canonical, for_mlflow, naming_of
from npp.train.bad_steps import BadSteps
from npp.train.cadence import Cadence
from npp.train.errors import TrainingError
from npp.train.run_record import column_params, default_run_name, mlflow_names, run_name


def test_cadence_is_a_function_of_the_step():
    c = Cadence(total_steps=20, sync_every=3, log_every=4, ckpt_every=5, eval_every=8, keep_steps=frozenset({7}))
    assert [s for s in range(1, 21) if c.ckpt_due(s)] == [5, 7, 10, 15]  # not at the end: the end saves anyway
    assert [s for s in range(1, 21) if c.eval_due(s)] == [8, 16, 20]  # and the last step
    synced = [s for s in range(1, 21) if c.sync_due(s)]
    assert synced == [3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 16, 18, 20]
    assert c.sync_due(11, skipped=True)  # a skipped step is agreed on at once
    quiet = Cadence(total_steps=20, sync_every=100, log_every=100, ckpt_every=100, eval_every=0)
    assert [s for s in range(1, 21) if quiet.sync_due(s) or quiet.eval_due(s)] == [20]


def test_bad_steps_are_counted_and_a_streak_stops_the_run():
    said = []
    bad = BadSteps(total=2, max_streak=3)
    bad.skipped(10, lambda: "step_5", said.append)
    bad.skipped(11, lambda: "step_5", said.append)
    bad.applied()  # a good step ends the streak, not the count
    bad.skipped(13, lambda: "step_5", said.append)
    bad.skipped(14, lambda: "step_5", said.append)
    assert bad.total == 6 and bad.streak == 2 and "2 in a row" in said[-1]
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps at step 15.*step_5.*--allow-change lr"):
        bad.skipped(15, lambda: "step_5", said.append)


def config(schedule="4:0.25,2:0.25,1:0.5", **first):
    return {"schedule": schedule,
            "first_identity": {"model": "GPT-B", "epochs": 300, "global_batch": 256, "seed": 1, **first}}


def test_a_run_is_named_and_tabled_by_what_defines_it():
    assert default_run_name(config()) == "GPT-B NPP 4:0.25 2:0.25 1:0.5 300ep s1"  # no comma: --runs takes names
    assert default_run_name(config("1:1")) == "GPT-B NTP 300ep s1"
    assert default_run_name(config("1:1", total_steps=24)) == "GPT-B NTP 24 steps s1"
    branch = {**config("1:1", epochs=173), "branch": {"parent": "/runs/gpt-b-ntp"}}
    assert default_run_name(branch) == "GPT-B NTP 173ep s1 (branch of gpt-b-ntp)"
    assert column_params(branch) == {"model": "GPT-B", "epochs": 173, "global_batch": 256, "seed": 1,
                                     "branch_parent": "gpt-b-ntp", "branch_budget_epochs": 173}
    assert run_name("mine", config(), "folder") == "mine" and run_name("", {}, "folder") == "folder"


def test_mlflow_names_put_results_first_and_diagnostics_apart():
    step = {"loss": 2.5, "train_flops": 3e15, "ckpt_s": 1.0, "corrupt_shards": 0, "lr": 1e-4}
    named = mlflow_names(step, 2)
    assert named == {"Results/loss": 2.5, "loss/k2": 2.5, "train_flops": 3e15, "train_pflops": 3.0,
                     "diag/ckpt_s": 1.0, "diag/corrupt_shards": 0, "Results/lr": 1e-4}
    # MLflow's sections are the prefixes sorted by code point, the unprefixed last: the results come first
    evals = {"curve/fid_toynet_n200": 50.0, "curve/is_toynet_n200": 6.0, "val/loss_k1": 1.4, "diag/eval_seconds": 3}
    logged = {**named, **for_mlflow(evals), **for_mlflow({"fid_toynet": 48.0, "sfid": 9.0})}
    sections = sorted({k.split("/")[0] for k in logged if "/" in k})
    assert sections[0] == "Results" and sections[-1] == "loss"
    assert {k for k in logged if k.startswith("Results/")} == {
        "Results/loss", "Results/lr", "Results/val_loss_k1", "Results/fid_toynet_n200", "Results/fid_toynet"}
    # npp compare and every reader take either naming as npp's own names; an older run keeps naming 1
    assert {canonical(k) for k in logged} == set(step) - {"ckpt_s", "corrupt_shards"} | {
        "diag/ckpt_s", "diag/corrupt_shards", "loss/k2", "train_pflops", *evals, "fid_toynet", "sfid"}
    assert mlflow_names(step, 2, naming=1)["loss"] == 2.5 and for_mlflow(evals, 1) == evals
    assert naming_of(["loss", "lr"]) == 1 and naming_of(["Results/loss"]) == naming_of([]) == 2


def test_a_run_folder_knows_its_complete_checkpoints(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.latest_tag() is None and run.tags() == [] and run.complete_tags() == []
    for step in (5, 10, 15):
        run.tag_dir(tag_for(step)).mkdir(parents=True)
    (run.checkpoints / (tag_for(20) + ".tmp")).mkdir()  # a save being written elsewhere: not a checkpoint
    run.set_latest(tag_for(10))  # step 15's directory is a save still running, or one that failed
    assert run.tags() == [tag_for(5), tag_for(10), tag_for(15)]
    assert run.complete_tags() == [tag_for(5), tag_for(10)] and tag_step(run.latest_tag()) == 10
    run.set_latest(tag_for(25))  # `latest` naming a directory that is gone counts as none
    assert run.latest_tag() is None and run.complete_tags() == []
    (run.tag_dir(tag_for(10)) / "client.json").write_text(json.dumps({"step": 10}))
    assert run.client_state(tag_for(10)) == {"step": 10} and run.client_state(tag_for(5)) == {}


def test_a_record_file_is_cut_back_to_a_step_and_a_line_cut_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
                      + '{"step": 6, "lo')
    assert truncate_jsonl(path, 3) == 3  # steps 4, 5 and the cut line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert truncate_jsonl(tmp_path / "absent.jsonl", 3) == 0
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temp file


def test_every_writer_replaces_a_file_whole_or_not_at_all(tmp_path):
    """npp.runtime.files.atomic_path, behind every file npp writes (JSON, parquet, npz, PNG, torch.save): the
    part is hidden from the scans that look for the target's kind, an error leaves the old file and no part, and
    numpy writes through an open file (a bare path would get `.npz` added)."""
    import numpy as np

    target = tmp_path / "piece_000001.npz"
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=np.arange(3))
        assert not list(tmp_path.glob("*.npz")) and tmp.name.startswith(".")  # not seen before it is whole
    assert np.load(target)["arr_0"].tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == [target.name]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert np.load(target)["arr_0"].tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_folder_is_replaced_whole_and_a_link_in_one_rename(tmp_path):
    """staged_dir (a branch's checkpoint, a universal conversion): built beside the target, a failed build leaves
    the old folder and no staging, a killed build's leftovers are cleared by the next; atomic_symlink (RUN/model.pt)
    moves a link without a moment when it is missing."""
    target = tmp_path / "step_000000004"
    with staged_dir(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("new, half")
        raise RuntimeError("ds_to_universal failed")
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    (tmp_path / "step_000000004.tmp").mkdir()  # left by a killed build
    (tmp_path / "step_000000004.tmp" / "stale").write_text("x")
    with staged_dir(target) as staging:
        staging.mkdir()
        (staging / "b").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    link = tmp_path / "model.pt"
    for name in ("model_1.pt", "model_2.pt"):
        atomic_symlink(name, link)
        assert os.readlink(link) == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", target.name]


def test_worker_counts_follow_slurm_each_time_and_the_exit_hook_is_registered_once(monkeypatch):
    """One formula (npp.runtime.workers.slurm_workers) for tokenize and train, read afresh (a cached reading
    would keep the first job's CPU count); the hook that ends loader workers at exit is registered once."""
    from npp.runtime import workers
    from npp.tokenize.config import auto_workers as tokenize_workers
    from npp.train.plan import auto_workers as train_workers

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "9")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert tokenize_workers(-1) == 8 and train_workers(-1, 100, 2) == 3 and train_workers(-1, 4, 2) == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert tokenize_workers(-1) == 2 and train_workers(-1, 100, 2) == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert tokenize_workers(-1) == 4 and train_workers(-1, 100, 2) == 4 and tokenize_workers(3) == 3
    registered = []
    monkeypatch.setattr(workers.atexit, "register", registered.append)
    workers.kill_workers_at_exit.cache_clear()
    workers.kill_workers_at_exit()
    workers.kill_workers_at_exit()
    assert len(registered) == 1
    workers.kill_workers_at_exit.cache_clear()  # the next caller registers the real hook


def test_config_json_and_mlflow_hold_one_record_of_a_start(tmp_path, shard_set):
    """run_record writes config.json and MLflow's params and tags from the same plan: the identity as params (once),
    how this start runs as tags (every start), an amendment named with the checkpoint it was made from."""
    import dataclasses

    from npp.train.config import TrainConfig
    from npp.train.identity import MUTABLE
    from npp.train.plan import make_plan
    from npp.train.run_record import dataset_identity, describe_changes, mlflow_params, mlflow_tags, write_run_files

    run = RunFolder(tmp_path / "r")
    plan = make_plan(TrainConfig(shards=str(shard_set), out=str(run.path), model="GPT-Nano", global_batch=16,
                                 epochs=2, seed=4), world_size=1)
    config, paths = write_run_files(run, plan, {"zero_optimization": {"stage": 2}}, "fp32")
    assert paths == [str(run.config), str(run.ds_config)]
    assert json.loads(run.ds_config.read_text()) == {"zero_optimization": {"stage": 2}}
    params = mlflow_params(json.loads(run.config.read_text()))  # what a later start reads back: the same params
    assert params["train"] == config["first_identity"] == plan.identity and params["data_digest"] == plan.data_digest
    assert {k: params[k] for k in ("model", "epochs", "global_batch", "seed")} == {
        "model": "GPT-Nano", "epochs": 2, "global_batch": 16, "seed": 4}
    tags = mlflow_tags(config, plan)
    assert {k for k in tags if k.startswith("flag.")} == {f"flag.{k}" for k in MUTABLE}
    assert (tags["world_size"], tags["zero_stage"], tags["precision"], tags["schedule"]) == (
        "1", "2", "fp32", "4:0.25,2:0.25,1:0.5")
    assert not any(k.startswith(("amended.", "npp.branch")) for k in tags)
    assert dataset_identity(plan) == {"name": "shards", "digest": plan.data_digest, "source": str(shard_set)}

    resumed = dataclasses.replace(plan, resume_tag="step_000000010", starts=config["starts"],
                                  changes={"log_every": (10, 5)}, amended={"lr": (1e-4, 2e-4)})
    again = write_run_files(run, resumed, {}, "fp32")[0]
    assert [s["resume_tag"] for s in again["starts"]] == [None, "step_000000010"]
    assert again["first_identity"] == config["first_identity"]  # params never change; the amendment is a tag
    assert mlflow_tags(again, resumed)["amended.lr"] == "0.0001 -> 0.0002 from step_000000010"
    assert describe_changes(resumed) == "flags changed since the last start (allowed on resume): --log-every 10 -> 5"


def test_the_run_record_keeps_the_flat_shape_every_run_folder_holds(tmp_path, shard_set):
    """config.json's `train` is every flag by its name, as typed (--mix-shards -1 resolved), and its identity the
    IDENTITY flags and DERIVED values: the shape run folders written by every earlier npp hold, so a resume compares
    like with like and reports no change that was not made."""
    import dataclasses

    from npp.train.config import TrainConfig
    from npp.train.identity import DERIVED, IDENTITY
    from npp.train.plan import make_plan, run_files

    cfg = TrainConfig(shards=str(shard_set), out=str(tmp_path / "r"), model="GPT-Nano", global_batch=16, epochs=2)
    plan = make_plan(cfg, world_size=1)
    record = run_files(plan, {}, "0000000", "fp32")
    assert record["train"] == {**dataclasses.asdict(cfg), "mix_shards": 256} and cfg.mix_shards == -1
    assert list(record["identity"]) == [*IDENTITY, *DERIVED]
    record["train"]["lr"] = 9.0  # the record is the caller's: the plan keeps its own
    assert plan.flags["lr"] == cfg.lr
    RunFolder(tmp_path / "r").path.mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(run_files(plan, {}, "0000000", "fp32")))
    again = make_plan(cfg, world_size=1)
    assert again.changes == {} and again.amended == {} and again.identity == plan.identity
