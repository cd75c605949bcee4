"""A run's identity: the flags that define it are fixed at its first start; the others may change on resume.

A resubmitted job with another `--model`, `--schedule` or `--lr` (a wrong `RUN=`, an edited
`TRAIN_FLAGS`) must never resume a run and silently rewrite what it claims to be. Every flag of
`npp train` is in exactly one of the two, declared with the flag itself (`flag(..., identity=True)` in
npp.train.config, shown by `--help`):

- IDENTITY: the flags that define what is trained and how (model, schedule, budget, optimizer, LR
  schedule, precision, data order, seed, the MLflow run it is logged in) plus the data identity
  (the shard set's content digest) and the ZeRO stage (a checkpoint holds its partitioning).
  A rerun that changes one is refused before anything starts, naming each change and the ways out;
  `--allow-change FLAG,...` makes such a change on purpose (a lower --lr after non-finite steps): the
  identity moves on, config.json's `starts` records it, MLflow gets an `amended.FLAG` tag (its params,
  immutable, keep the first start's values).
- MUTABLE: how this start runs the same training (loader workers, cadence of logs, checkpoints,
  syncs and evaluations, tracking on or off, compile, activation checkpointing, where the DeepSpeed
  JSON and the eval files are). Changes are accepted, printed, and recorded in config.json's
  `starts` and MLflow's `flag.*` tags.

MLflow holds the identity as the run's params (immutable, as MLflow's params are) and the mutable
flags as tags that every start rewrites, so config.json and MLflow never disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from npp.errors import UsageError
from npp.train.config import TrainConfig

IDENTITY = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("identity"))
MUTABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("identity"))
# Not flags, but as fixed as them: what the data is and how the checkpoint is partitioned.
DERIVED = ("data_digest", "zero_stage")


def identity_of(train: dict, derived: dict) -> dict:
    """The run-defining values of a start: the IDENTITY flags and the DERIVED values."""
    return {**{k: train.get(k) for k in IDENTITY}, **{k: derived.get(k) for k in DERIVED}}


def _spell(key: str) -> str:
    return {"data_digest": "the shard set's content", "zero_stage": "the ZeRO stage of --ds-config"}.get(
        key, "--" + key.replace("_", "-"))


def check_same_run(saved: dict, now: dict, out: str, allowed: tuple = ()) -> dict[str, tuple[Any, Any]]:
    """Refuse a start whose identity differs from the run's; one line lists every change. Returns the changes
    `allowed` names (--allow-change: amendments made on purpose, such as a lower --lr after non-finite steps).

    `saved` is the identity recorded in config.json (keys an older version did not record are not compared).
    """
    unknown = [k for k in allowed if k not in IDENTITY]
    if unknown:
        raise UsageError(f"--allow-change {','.join(unknown)}: not a defining flag (those are: {', '.join(IDENTITY)}); "
                         "the other flags may change on resume without it")
    changed = [k for k in now if k in saved and saved[k] != now[k] and k not in allowed]
    if changed:
        diffs = "; ".join(f"{_spell(k)}: {saved[k]!r} at the start, {now[k]!r} now" for k in changed)
        raise UsageError(
            f"{out} is a run started with other settings ({diffs}). A run's defining flags are fixed at its first "
            f"start: rerun with the same flags to resume it, or pass a new --out to start another run (or, on "
            f"purpose, --allow-change {','.join(k for k in changed if k in IDENTITY) or 'FLAG'})"
        )
    return {k: (saved[k], now[k]) for k in allowed if k in saved and saved[k] != now[k]}


def mutable_changes(saved_train: dict, now_train: dict) -> dict[str, tuple[Any, Any]]:
    """The MUTABLE flags this start changes: {flag: (before, now)}."""
    return {k: (saved_train[k], now_train.get(k)) for k in MUTABLE if k in saved_train
            and saved_train[k] != now_train.get(k)}
