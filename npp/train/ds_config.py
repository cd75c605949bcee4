"""Build the DeepSpeed config: the JSON file merged with the run's own settings.

Batch sizes, clipping and precision come from the train flags (never "auto": those are
filled by the HF integration, not by DeepSpeed), so the file only says how to shard;
a key the file sets that npp decides is replaced, and the plan says which
(`OWNED_KEYS`). Everything is checked before any process group does work
(npp.train.plan). This module takes plain values: it imports no config class.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from npp.errors import NppError
from npp.runtime.settings import TRAINING_PRECISIONS

# Keys npp sets from its flags; a value for them in the JSON file is replaced (and said so).
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "bf16.enabled", "fp16")


class DeepSpeedConfigError(NppError, ValueError):
    pass


def resolve_ds_path(path: str) -> str:
    """--ds-config as given (relative to the working directory), or else relative to npp's checkout, where
    ds_configs/ lives: the default resolves wherever a command is run from."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return str(given)
    checkout = Path(__file__).resolve().parents[2] / path
    return str(checkout) if checkout.exists() else str(given)


def load_ds_json(path: str) -> dict:
    shipped = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))
    hint = f"pass --ds-config with one of ds_configs/{{{','.join(shipped)}}}" if shipped else "pass --ds-config FILE"
    if os.path.isdir(path):
        raise DeepSpeedConfigError(f"--ds-config {path} is a directory, not a DeepSpeed JSON file: {hint}")
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist: {hint}")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} must be a JSON object")
    return cfg


def micro_batch(global_batch: int, grad_accum: int, world_size: int) -> int:
    per_step = world_size * grad_accum
    if global_batch % per_step:
        raise DeepSpeedConfigError(
            f"--global-batch {global_batch} does not divide by world size {world_size} x --grad-accum "
            f"{grad_accum}: choose a global batch that is a multiple of {per_step}"
        )
    return global_batch // per_step


def zero_stage(ds: dict, path: str) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage must be 0-3, got {stage}")
    return stage


def replaced_keys(ds: dict) -> list[str]:
    """The keys of a DeepSpeed JSON that npp overrides from its flags (OWNED_KEYS)."""
    found = []
    for key in OWNED_KEYS:
        head, _, tail = key.partition(".")
        if head in ds and (not tail or (isinstance(ds[head], dict) and tail in ds[head])):
            found.append(key)
    return found


def check_skips_non_finite(ds: dict, stage: int, precision: str, path: str) -> None:
    """Refuse DeepSpeed configurations that would apply an update with non-finite gradients, or that DeepSpeed
    refuses only after start-up. `precision` may be "auto" (bf16-mixed on CUDA, fp32 on CPU: neither is bf16).

    The trainer relies on DeepSpeed skipping such a step (npp.train.bad_steps): its ZeRO
    optimizers do when the global gradient norm is invalid; a plain fp32 engine at stage 0
    steps the torch optimizer as is, and stage 0 with bf16 weights and the fp32 gradient
    accumulation npp sets is "an unsupported mix" to DeepSpeed 0.19 (NotImplementedError in
    engine._do_optimizer_sanity_check, after the process group and the model are up).
    """
    zero = ds.get("zero_optimization", {})
    if stage == 0:
        why = ("bf16 weights with fp32 gradient accumulation are not supported by DeepSpeed at stage 0" if precision
               == "bf16" else f"{precision} weights would apply non-finite gradients (DeepSpeed skips such steps only "
               "in its ZeRO optimizers)")
        raise DeepSpeedConfigError(f"{path}: ZeRO stage 0 with {why}: use ds_configs/zero1.json (on one GPU it holds "
                                   "the same)")
    if stage in (1, 2) and zero.get("compute_grad_norm") is False:
        raise DeepSpeedConfigError(f"{path}: zero_optimization.compute_grad_norm=false turns off DeepSpeed's skip of "
                                   "non-finite steps: remove it")
    if stage in (1, 2) and precision == "bf16" and ds.get("bf16", {}).get("check_grad_overflow") is False:
        raise DeepSpeedConfigError(f"{path}: bf16.check_grad_overflow=false turns off DeepSpeed's skip of non-finite "
                                   "steps under bf16: remove it")


def check_ds_json(ds: dict, path: str, precision: str, ema: bool, evaluates: bool = False) -> int:
    """Everything about the JSON that can be refused before start-up; returns its ZeRO stage."""
    stage = zero_stage(ds, path)
    check_skips_non_finite(ds, stage, precision, path)
    if ema and stage == 3:
        raise DeepSpeedConfigError("--ema with ZeRO-3 is not supported (parameters are partitioned): use ZeRO-1/2 or "
                                   "drop --ema")
    if evaluates and stage == 3:
        raise DeepSpeedConfigError("--eval-every with ZeRO-3 is not supported (the weights are partitioned): use "
                                   "ZeRO-1/2, or evaluate the checkpoints afterwards with `npp sample` + `npp eval`")
    return stage


GRAD_COMMS = ("auto", "fp32", "bf16")
# ZeRO-1/2 reduce gradients in buckets of this many elements as backward produces them: a bucket as large as the
# model (DeepSpeed's 5e8 default, the 2e8 npp's JSONs used to set, against GPT-B's 111M) is reduced only after the
# whole backward, with nothing to overlap. A model's parameters / BUCKETS per bucket, within these bounds.
BUCKETS = 8
BUCKET_BOUNDS = (5_000_000, 200_000_000)


def bucket_elements(params: int) -> int:
    """Elements per ZeRO-1/2 reduce (and all-gather) bucket for a model of `params` parameters."""
    low, high = BUCKET_BOUNDS
    return int(min(high, max(low, -(-params // BUCKETS))))


def device_ds_config(ds_json: dict, *, micro: int, grad_accum: int, global_batch: int, grad_clip: float,
                     precision: str, cuda: bool, grad_comm: str = "auto", params: int | None = None) -> dict:
    """The checked JSON with npp's settings for this device: batch sizes, clipping, precision (resolved, never
    "auto"); the gradient reduction's dtype (`grad_comm`: auto keeps the JSON's `communication_data_type`, else
    fp32); bucket sizes from the model's `params` where the JSON sets none; on CPU no reduce-scatter (gloo has
    none) and no offload."""
    if precision not in TRAINING_PRECISIONS:
        raise DeepSpeedConfigError(f"device_ds_config takes a resolved precision ({', '.join(TRAINING_PRECISIONS)}), "
                                   f"got {precision!r}")
    ds = copy.deepcopy(ds_json)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds.pop(key, None)  # ours: one source of truth for batch sizes
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = global_batch
    ds["gradient_clipping"] = grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds.pop("fp16", None)
    if grad_comm not in GRAD_COMMS:
        raise DeepSpeedConfigError(f"--grad-comm must be one of {', '.join(GRAD_COMMS)}, got {grad_comm!r}")
    if precision == "bf16":  # fp32 accumulation unless the JSON opts out
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if grad_comm != "auto":
        ds["communication_data_type"] = grad_comm
    else:
        ds.setdefault("communication_data_type", "fp32")
    ds["zero_allow_untested_optimizer"] = True  # our AdamW with decay groups (torch, fused on CUDA)
    ds.setdefault("steps_per_print", 10**9)
    # DeepSpeed's timers wait for the GPU: its ThroughputTimer (on by default) calls the accelerator's synchronize
    # at every forward and step, wall_clock_breakdown at every phase. npp times its own steps at the log points,
    # so both are off unless the JSON turns them on.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {})
    if params and zero.get("stage") in (1, 2):
        zero.setdefault("reduce_bucket_size", bucket_elements(params))
        zero.setdefault("allgather_bucket_size", bucket_elements(params))
    if not cuda:
        # gloo has no reduce_scatter; CPU training gains nothing from offloading to the CPU.
        zero["reduce_scatter"] = False
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return ds


def build_ds_config(cfg, world_size: int, cuda: bool, precision: str, params: int | None = None) -> dict:
    """The DeepSpeed config of a train config (anything with its fields) outside `npp train`'s plan: benches,
    standalone steps, tests. `precision` is the resolved one (npp.runtime.settings.precision), never "auto";
    `params`: the model's parameter count (bucket sizes)."""
    path = resolve_ds_path(cfg.ds_config)
    ds = load_ds_json(path)
    check_ds_json(ds, path, precision, cfg.ema)
    return device_ds_config(ds, micro=micro_batch(cfg.global_batch, cfg.grad_accum, world_size),
                            grad_accum=cfg.grad_accum, global_batch=cfg.global_batch, grad_clip=cfg.grad_clip,
                            precision=precision, cuda=cuda, grad_comm=getattr(cfg, "grad_comm", "auto"),
                            params=params)
