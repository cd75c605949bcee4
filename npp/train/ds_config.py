"""Build the DeepSpeed config: the JSON file merged with the run's own settings.

Batch sizes, clipping and precision come from TrainConfig (never "auto": those are
filled by the HF integration, not by DeepSpeed), so the file only says how to shard.
Everything is checked before any process group does work.
"""

from __future__ import annotations

import copy
import json
import os

from npp.errors import NppError
from npp.train.config import TrainConfig


class DeepSpeedConfigError(NppError, ValueError):
    pass


def load_ds_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist: pass --ds-config ds_configs/zero2.json or another file")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} must be a JSON object")
    return cfg


def micro_batch(cfg: TrainConfig, world_size: int) -> int:
    per_step = world_size * cfg.grad_accum
    if cfg.global_batch % per_step:
        raise DeepSpeedConfigError(
            f"--global-batch {cfg.global_batch} does not divide by world size {world_size} x --grad-accum "
            f"{cfg.grad_accum}: choose a global batch that is a multiple of {per_step}"
        )
    return cfg.global_batch // per_step


PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def resolve_precision(precision: str, cuda: bool) -> str:
    """auto: bf16-mixed on CUDA (LlamaGen's recipe), fp32 on CPU. Called once per run; the result goes to
    the DeepSpeed config, the model, the EMA and the benches (npp.train.step says how each uses it).

    bf16-mixed: fp32 weights, optimizer and gradient all-reduce; the model's forward runs
    under bf16 autocast, opened inside the module (see npp.train.step). bf16: DeepSpeed's
    bf16 mode (bf16 weights and activations, fp32 master weights in the optimizer), with
    fp32 gradient accumulation and fp32
    communication unless the DeepSpeed JSON sets `data_types.grad_accum_dtype` /
    `communication_data_type` itself. Both run on CPU too (the tests use that).
    """
    if precision == "auto":
        return "bf16-mixed" if cuda else "fp32"
    if precision not in PRECISIONS:
        raise DeepSpeedConfigError(f"--precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def check_skips_non_finite(ds: dict, stage: int, precision: str, path: str) -> None:
    """Refuse DeepSpeed configurations that would apply an update with non-finite gradients.

    The trainer relies on DeepSpeed skipping such a step (npp.train.bad_steps): its ZeRO
    optimizers do when the global gradient norm is invalid, and so does its bf16
    optimizer at stage 0; a plain fp32 engine at stage 0 steps the torch optimizer as is.
    """
    zero = ds.get("zero_optimization", {})
    if stage == 0 and precision != "bf16":
        raise DeepSpeedConfigError(
            f"{path}: ZeRO stage 0 with {precision} weights would apply non-finite gradients (DeepSpeed skips such "
            "steps only in its ZeRO and bf16 optimizers): use ds_configs/zero1.json (on one GPU it holds the same)"
        )
    if stage in (1, 2) and zero.get("compute_grad_norm") is False:
        raise DeepSpeedConfigError(f"{path}: zero_optimization.compute_grad_norm=false turns off DeepSpeed's skip of "
                                   "non-finite steps: remove it")
    if stage in (1, 2) and precision == "bf16" and ds.get("bf16", {}).get("check_grad_overflow") is False:
        raise DeepSpeedConfigError(f"{path}: bf16.check_grad_overflow=false turns off DeepSpeed's skip of non-finite "
                                   "steps under bf16: remove it")


def build_ds_config(cfg: TrainConfig, world_size: int, cuda: bool, precision: str) -> dict:
    """The DeepSpeed config of this run; `precision` is the resolved one (resolve_precision), never "auto"."""
    if precision not in PRECISIONS:
        raise DeepSpeedConfigError(f"build_ds_config takes a resolved precision ({', '.join(PRECISIONS)}), "
                                   f"got {precision!r}")
    ds = copy.deepcopy(load_ds_json(cfg.ds_config))
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{cfg.ds_config}: zero_optimization.stage must be 0-3, got {stage}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds.pop(key, None)  # ours: one source of truth for batch sizes
    ds["train_micro_batch_size_per_gpu"] = micro_batch(cfg, world_size)
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.global_batch
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds.pop("fp16", None)
    check_skips_non_finite(ds, stage, precision, cfg.ds_config)
    if precision == "bf16":  # fp32 accumulation and reduction unless the JSON opts out
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
    ds["zero_allow_untested_optimizer"] = True  # our AdamW with decay groups (torch, fused on CUDA)
    ds.setdefault("steps_per_print", 10**9)
    zero = ds.setdefault("zero_optimization", {})
    if not cuda:
        # gloo has no reduce_scatter; CPU training gains nothing from offloading to the CPU.
        zero["reduce_scatter"] = False
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    if cfg.ema and stage == 3:
        raise DeepSpeedConfigError("--ema with ZeRO-3 is not supported (parameters are partitioned): use ZeRO-1/2 or drop --ema")
    return ds
