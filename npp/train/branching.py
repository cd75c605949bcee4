"""Compute-matched next-token baselines for a fifth of their cost: a shorter run branched off a longer one.

Under npp's per-stage learning-rate schedule (warmup, constant, linear decay over the last
`--decay-ratio`), a single-stage run (`--schedule 1:1`) of E' < E epochs takes, step for step,
the E-epoch run's steps until its own decay begins: the same warmup, constant rate, data order
and dropout draws. So the E-epoch run started with `--branch-epochs E'` keeps its checkpoint at
that step (npp.train.schedule.branch_step), and `npp train branch --from RUN --epochs E' --out OUT`
trains only the decay from it: the result is the E'-epoch run trained from scratch (tested bit
for bit), at `--decay-ratio` of its cost.

A branch is a run folder of its own: its config.json is the parent's flags with `--epochs E'`
(and its own `--out` and run name) plus a `branch` record (the parent, the step), its
checkpoint at the branch step is the parent's files hard-linked (copied across filesystems),
its metrics.jsonl and MLflow outbox start with the parent's records up to that step, so its
own MLflow run shows the whole E'-epoch curve and its `train_flops` and hours count the shared
prefix: a branch's cost is its budget's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from npp.errors import UsageError
from npp.pipeline.eval_spec import RUN_FILES
from npp.pipeline.runs import RunFolder, tag_for, tag_step
from npp.runtime.files import atomic_write_text, staged_dir
from npp.train.config import EVAL_PREFIXED, TrainConfig
from npp.train.schedule import branch_points, parse_schedule, warmup_steps

# `npp train branch` may set these beside --from/--epochs/--out; every other flag is the parent's, since a
# flag that changes what is computed (the loader workers and micro-batch change the data order) would make the
# branch another run than the shorter one it stands for.
BRANCH_OVERRIDES = ("shards", "run_name", "tracking", "log_every", "ckpt_every", "keep", "sync_every",
                    "eval_every", "eval_every_epochs", *("eval_" + n for n in EVAL_PREFIXED), *RUN_FILES)


def parent_record(parent: RunFolder) -> dict:
    if not parent.config.exists():
        raise UsageError(f"--from {parent.path} is not a training run (no config.json): pass the --out of the run "
                         "started with --branch-epochs")
    return parent.read_config()


def warmup_steps_of(train: dict, steps_per_epoch: int) -> int:
    """A recorded run's warmup in steps, by the plan's rule (npp.train.schedule.warmup_steps)."""
    return warmup_steps(float(train["warmup_epochs"]), steps_per_epoch)


def branch_config(parent_path: str, epochs: int, out: str, overrides: dict | None = None) -> tuple[TrainConfig, dict]:
    """The TrainConfig of the E'-epoch branch of a run and its `branch` record; refuses, in one line, a branch
    point that is not one (a multi-stage or step-budget parent, E' out of range, an amended parent).

    A branch that has started already is rebuilt from its own folder (its config.json holds the flags and the
    record): it resumes without its parent, which may have moved. A new one takes the parent's flags as they
    were when the parent wrote the branch point's checkpoint: its loader workers and micro-batch from the start
    that wrote it (the data order depends on them; the parent may have been resumed with others since).
    """
    unknown = sorted(set(overrides or {}) - set(BRANCH_OVERRIDES))
    if unknown:
        raise UsageError(f"npp train branch: --{unknown[0].replace('_', '-')} would make the branch another run than "
                         f"the {epochs}-epoch one it stands for: the parent's value is used")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    own = RunFolder(out)
    if own.config.exists() and (own.read_config().get("branch") or {}).get("epochs") == int(epochs):
        saved = own.read_config()
        flags = {**saved["train"], "out": str(out), **(overrides or {})}
        return TrainConfig(**{k: v for k, v in flags.items() if k in names}), saved["branch"]
    parent = RunFolder(parent_path)
    saved = parent_record(parent)
    train = dict(saved["train"])
    if train.get("total_steps"):
        raise UsageError(f"--from {parent.path} has a step budget (--total-steps {train['total_steps']}): branches "
                         "are shorter runs in epochs; train the parent with --epochs")
    if saved.get("branch"):
        raise UsageError(f"--from {parent.path} is itself a branch (of {saved['branch']['parent']}): branch off "
                         "the full run")
    if any(start.get("amended") for start in saved.get("starts", [])):
        raise UsageError(f"--from {parent.path} had defining flags amended (--allow-change) during its run: no step "
                         "of it is a step of a shorter run started with its flags; train that run from scratch")
    spe = int(saved["steps_per_epoch"])
    stages = parse_schedule(saved["schedule"])
    step = branch_points(stages, int(train["epochs"]), spe, warmup_steps_of(train, spe), float(train["decay_ratio"]),
                         [int(epochs)])[int(epochs)]
    layout = writer_of(saved.get("starts", []), step)
    world, micro = layout.get("world_size"), layout.get("micro_batch")
    flags = {**train, "out": str(out), "epochs": int(epochs), "branch_epochs": "", "run_name": "", "allow_change": "",
             **({"workers": int(layout["workers"])} if layout.get("workers") is not None else {}),
             **({"grad_accum": int(train["global_batch"]) // (int(world) * int(micro))} if world and micro else {}),
             **(overrides or {})}
    cfg = TrainConfig(**{k: v for k, v in flags.items() if k in names})
    record = {"parent": str(parent.path.resolve()), "parent_epochs": int(train["epochs"]), "epochs": int(epochs),
              "step": step, "tag": tag_for(step), "parent_mlflow_run_id": parent.mlflow_run_id()}
    return cfg, record


def writer_of(starts: list[dict], step: int) -> dict:
    """The start of a run that trained through `step` (the last one that resumed before it), or {}."""
    before = [s for s in starts if not s.get("resume_tag") or tag_step(s["resume_tag"]) < step]
    return before[-1] if before else {}


def check_branch_checkpoint(parent: RunFolder, record: dict) -> None:
    """The parent's checkpoint at the branch step is there and complete, or one line says why and what to do."""
    tag, step = record["tag"], record["step"]
    latest = parent.latest_tag()
    if tag in parent.complete_tags():
        if parent.is_universal(tag):
            raise UsageError(f"{parent.tag_dir(tag)} is a universal checkpoint (no per-rank RNG): a branch from it "
                             "is not the shorter run; branch from the checkpoint the parent's own ranks wrote")
        return
    if latest is None or tag_step(latest) < step:
        raise UsageError(f"{parent.path} has not reached step {step} yet, where the {_epochs(record)}-epoch branch "
                         f"begins (latest checkpoint: {latest or 'none'}): branch once it has (rerun this command)")
    raise UsageError(f"{parent.path} kept no checkpoint at step {step} (the {_epochs(record)}-epoch branch point): "
                     f"start such a parent with --branch-epochs listing the branches, or train that run from "
                     "scratch")


def _epochs(record: dict) -> str:
    return str(record.get("epochs", "shorter"))


def own_mlflow_run_id(branch: dict | None, state) -> str | None:
    """The MLflow run a start resumes: the checkpoint's, except a branch's at its branch step (that checkpoint
    is the parent's: the branch logs into a run of its own)."""
    return None if branch and state.step == branch["step"] else state.mlflow_run_id


def start_branch(out: RunFolder, record: dict, is_main: bool, device, log=print) -> None:
    """A branch's first start on every rank: rank 0 prepares the folder, and every rank learns whether it did
    (one all-reduce), so a failed preparation is one error on every rank, not the others waiting in a barrier."""
    from npp.train.distributed import all_sum
    from npp.train.errors import TrainingError

    failed = None
    if is_main:
        try:
            prepare_branch_folder(out, record, log)
        except OSError as e:
            failed = e
    if all_sum([1.0 if failed else 0.0], device)[0] > 0:
        raise TrainingError(f"the branch's checkpoint could not be put in {out.checkpoints}"
                            + (f" ({type(failed).__name__}: {failed})" if failed else " (see rank 0's error)")
                            + ": free space or fix the permissions and rerun the same command")


def prepare_branch_folder(out: RunFolder, record: dict, log=print) -> None:
    """Put the parent's checkpoint at the branch step into OUT (hard links, else copies) as OUT's latest, and
    OUT's metrics.jsonl and MLflow outbox as the parent's up to that step. Idempotent; `latest` is written last,
    so an interrupted preparation is redone by the next start."""
    parent = RunFolder(record["parent"])
    tag, step = record["tag"], int(record["step"])
    out.checkpoints.mkdir(parents=True, exist_ok=True)
    with staged_dir(out.tag_dir(tag)) as staging:
        shutil.copytree(parent.tag_dir(tag), staging, copy_function=_link_or_copy)
    for src, dst in ((parent.metrics, out.metrics), (parent.outbox, out.outbox)):
        atomic_write_text(dst, "".join(line + "\n" for line in _records_through(src, step)))
    out.set_latest(tag)
    log(f"branch of {parent.path} at step {step}: trains the decay of its {record['epochs']}-epoch run")


def _link_or_copy(src: str, dst: str) -> str:
    """DeepSpeed writes every checkpoint into files of its own and never rewrites one: a hard link shares a
    parent's gigabytes safely (and survives the parent pruning it)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _records_through(path: Path, step: int) -> list[str]:
    """The records at or before `step` (a line the parent is still writing, or cut by a kill, is left out)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return kept
