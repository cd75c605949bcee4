"""What a start writes about its run: config.json (atomically), the DeepSpeed config it used, and what MLflow
holds, from the same plan, so the files and MLflow never disagree.

MLflow params are immutable, so they hold the run's identity (npp.train.identity: the flags fixed at the
first start, the model, the schedule, the data); how this start runs it (the mutable flags, world size,
precision, job) is in tags that every start rewrites, and in config.json's `starts`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from npp.pipeline.runs import RunFolder
from npp.runtime.files import atomic_write_text, git_commit
from npp.runtime.metric_names import DIAG, NAMING, for_mlflow
from npp.train.identity import MUTABLE
from npp.train.plan import TrainPlan, run_files


def write_run_files(run: RunFolder, plan: TrainPlan, ds_config: dict, precision: str) -> tuple[dict, list[str]]:
    """config.json and ds_config.json of this start (rank 0); returns the config and the files' paths."""
    run.path.mkdir(parents=True, exist_ok=True)
    config = run_files(plan, ds_config, git_commit(), precision)
    atomic_write_text(run.config, json.dumps(config, indent=2, default=str))
    atomic_write_text(run.ds_config, json.dumps(ds_config, indent=2))
    return config, [str(run.config), str(run.ds_config)]


# Step metrics that diagnose the machinery rather than the model: MLflow's charts list them under `diag/`, after
# the results (npp.runtime.metric_names).
DIAGNOSTICS = ("log_s", "ckpt_s", "eval_s", "corrupt_shards", "bad_steps")


def mlflow_names(metrics: dict, patch_side: int, naming: int = NAMING) -> dict:
    """A log step's metrics as MLflow shows them: the results first (`Results/loss`, `Results/lr` in naming 2,
    npp.runtime.metric_names), diagnostics under `diag/`, the FLOPs also in PFLOPs (an axis that reads 1.2, not
    1.2e15), and the loss also per patch side (`loss/k4`, `loss/k2`, `loss/k1`: NPP's stages as separate series,
    not jumps of one; a k x k patch's loss sums k^2 targets' scale differently). metrics.jsonl and the log line
    keep their names."""
    named = {(DIAG + k if k in DIAGNOSTICS else k): v for k, v in metrics.items()}
    named["train_pflops"] = metrics["train_flops"] / 1e15
    named[f"loss/k{patch_side}"] = metrics["loss"]
    return for_mlflow(named, naming)


def mlflow_params(config: dict) -> dict:
    """The run's first identity as MLflow params (logged once, when the run is created; amendments are tags), and
    what tells runs apart as short top-level params the runs table shows as columns (model, parameters,
    schedule, epochs, global_batch, seed; a branch's parent and budget)."""
    keep = ("model_config", "parameters", "schedule", "schedule_steps", "total_steps", "steps_per_epoch",
            "shards_meta", "data_digest", "heldout", "branch")
    return {"train": dict(config["first_identity"]), **{k: config[k] for k in keep if k in config},
            **column_params(config)}


def column_params(config: dict) -> dict:
    first = config["first_identity"]
    columns = {"model": first.get("model"), "epochs": first.get("epochs"), "global_batch": first.get("global_batch"),
               "seed": first.get("seed")}
    branch = config.get("branch")
    if branch:
        columns.update(branch_parent=Path(branch["parent"]).name, branch_budget_epochs=first.get("epochs"))
    return {k: v for k, v in columns.items() if v is not None}


def run_name(given: str, config: dict, folder: str) -> str:
    """--run-name, else what defines the run (a rank without the config: the folder's name)."""
    return given or (default_run_name(config) if config else folder)


def default_run_name(config: dict) -> str:
    """What defines the run, as its MLflow name: 'GPT-B NPP 4:0.25 2:0.25 1:0.5 300ep s0', 'GPT-B NTP 300ep s0',
    a branch 'GPT-B NTP 173ep s0 (branch of gpt-b-ntp)'."""
    first = config["first_identity"]
    # no commas: `npp compare --runs` takes a comma list of names
    kind = "NTP" if config["schedule"] == "1:1" else "NPP " + config["schedule"].replace(",", " ")
    budget = f"{first['total_steps']} steps" if first.get("total_steps") else f"{first.get('epochs')}ep"
    name = f"{first.get('model')} {kind} {budget} s{first.get('seed')}"
    branch = config.get("branch")
    return name + (f" (branch of {Path(branch['parent']).name})" if branch else "")


def mlflow_tags(config: dict, plan: TrainPlan) -> dict:
    """How this start runs the run: rewritten at every start."""
    tags = {"git_commit": config["git_commit"], "mlflow.source.git.commit": config["git_commit"],
            "mlflow.source.name": "npp train", "mlflow.source.type": "LOCAL",
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "zero_stage": str(plan.zero_stage),
            "schedule": config["schedule"], "world_size": str(plan.world_size), "precision": config["precision"]}
    train = config["train"]
    tags.update({f"flag.{k}": str(train.get(k)) for k in MUTABLE})
    branch = config.get("branch")
    if branch:  # the shorter run it stands for, and where it left its parent
        tags.update({"npp.branch_parent": str(branch.get("parent_mlflow_run_id") or ""),
                     "npp.branch_parent_dir": branch["parent"], "npp.branch_step": str(branch["step"])})
    if config.get("branch_points"):
        tags["npp.branch_points"] = json.dumps(config["branch_points"])
    for start in config.get("starts", []):  # every amendment of the identity (--allow-change), the latest last
        for k, change in start.get("amended", {}).items():
            tags[f"amended.{k}"] = f"{change['was']!r} -> {change['now']!r} from {start.get('resume_tag')}"
    return tags


def dataset_identity(plan: TrainPlan) -> dict:
    """The shard set(s) as MLflow sees a dataset: name, a digest of every shard's sha256, where it lives."""
    sets = plan.meta.get("sets") or [plan.feed.shards]
    return {"name": ",".join(Path(s).name for s in sets), "digest": plan.data_digest,
            "source": os.path.abspath(sets[0])}


def describe_changes(plan: TrainPlan) -> str:
    return "flags changed since the last start (allowed on resume): " + ", ".join(
        f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in plan.changes.items()
    )
