"""The names metrics have in MLflow, and back: one mapping for the trainer that logs them and the stages that read
them (npp compare), so that runs logged under either naming compare as one.

Why a naming of MLflow's own: MLflow 3's chart view and a run's Model metrics tab make one section per name
prefix (the part before `/`), sorted by code point, and put the unprefixed metrics last. So naming 2 (runs begun
now) puts the results under `Results/` (an upper-case R sorts before every lower-case prefix): the training loss,
the next-token held-out loss, the learning rate, the FID points during training and the final FIDs (`npp eval`)
open the page; then `curve/` (the other eval
points: IS, precision, ...), `diag/` (what the machinery cost, last of what npp logs), `loss/` (the loss per
patch side). Naming 1 is how runs begun before it were logged (`loss`, `lr`, `val/loss_k1`, `curve/fid_*`): such
a run keeps it when it resumes (recorded in config.json as `mlflow_names`), so its charts never split in two.

metrics.jsonl, the log lines and `npp compare`'s own keys use the canonical names (naming 1's).
"""

from __future__ import annotations

import re

RESULTS = "Results/"
CURVE = "curve/"  # an eval point during training: `curve/<metric>_n<samples>` (npp.eval.during_training)
DIAG = "diag/"  # the machinery: seconds spent logging, saving, evaluating; skipped steps; corrupt shards
HELDOUT = "val/loss_k1"  # the next-token loss on the held-out shards: comparable across schedules

NAMING = 2  # what a run begun now records
_HEADLINE = {"loss": RESULTS + "loss", "lr": RESULTS + "lr", HELDOUT: RESULTS + "val_loss_k1"}
_CANONICAL = {v: k for k, v in _HEADLINE.items()}
_SAMPLES = re.compile(r"_n[0-9]+(_|$)")  # an eval point's sample count (npp.eval.during_training.curve_key)


def to_mlflow(key: str, naming: int = NAMING) -> str:
    """`key` (canonical) as a run of `naming` logs it in MLflow."""
    if naming < 2:
        return key
    if key in _HEADLINE:
        return _HEADLINE[key]
    if key.startswith(CURVE + "fid"):  # an eval point's FID: `Results/fid_toynet_n200`
        return RESULTS + key[len(CURVE):]
    if key.startswith("fid"):  # the final evaluation's (npp eval): `Results/fid_toynet`, no `_n<samples>`
        return RESULTS + key
    return key


def for_mlflow(metrics: dict, naming: int = NAMING) -> dict:
    return {to_mlflow(k, naming): v for k, v in metrics.items()}


def canonical(key: str) -> str:
    """An MLflow metric name of either naming (or a name a user typed) as npp's own: `Results/loss` -> `loss`,
    `Results/fid_toynet_n200` -> `curve/fid_toynet_n200`, `Results/fid_toynet` -> `fid_toynet`; anything else
    as it is."""
    if key in _CANONICAL:
        return _CANONICAL[key]
    if key.startswith(RESULTS + "fid"):
        rest = key[len(RESULTS):]
        return CURVE + rest if _SAMPLES.search(rest) else rest
    return key


def naming_of(metric_keys) -> int:
    """The naming of a run from the metrics it holds (for `npp eval`, which logs into a training run it did not
    start): 2 once anything is under `Results/`, 1 for a run with metrics and none there, else the current."""
    keys = [k for k in metric_keys if not k.startswith("system/")]  # MLflow's own: no naming
    if not keys or any(k.startswith(RESULTS) for k in keys):
        return NAMING
    return 1


def is_training_loss(key: str) -> bool:
    """The per-step training loss under either naming (the point that dates a run's last training step)."""
    return canonical(key) == "loss"
