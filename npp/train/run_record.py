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

from npp.pipeline.files import atomic_write_text, git_commit
from npp.pipeline.runs import RunFolder
from npp.train.identity import MUTABLE
from npp.train.plan import TrainPlan, run_files


def write_run_files(run: RunFolder, plan: TrainPlan, ds_config: dict, precision: str) -> tuple[dict, list[str]]:
    """config.json and ds_config.json of this start (rank 0); returns the config and the files' paths."""
    run.path.mkdir(parents=True, exist_ok=True)
    config = run_files(plan, ds_config, git_commit(), precision)
    atomic_write_text(run.config, json.dumps(config, indent=2, default=str))
    atomic_write_text(run.ds_config, json.dumps(ds_config, indent=2))
    return config, [str(run.config), str(run.ds_config)]


def mlflow_params(config: dict) -> dict:
    """The run's first identity as MLflow params (logged once, when the run is created; amendments are tags)."""
    keep = ("model_config", "parameters", "schedule", "schedule_steps", "total_steps", "steps_per_epoch",
            "shards_meta", "data_digest", "heldout", "branch")
    return {"train": dict(config["first_identity"]), **{k: config[k] for k in keep if k in config}}


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
    sets = plan.meta.get("sets") or [plan.cfg.shards]
    return {"name": ",".join(Path(s).name for s in sets), "digest": plan.data_digest,
            "source": os.path.abspath(sets[0])}


def describe_changes(plan: TrainPlan) -> str:
    return "flags changed since the last start (allowed on resume): " + ", ".join(
        f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in plan.changes.items()
    )
