"""The training step and what it runs on: the one step the trainer loops and `make gpu-check` times.

`build_model_and_optimizer` puts the GPT on its device with the run's precision and
builds AdamW over the parameters there; `start_engine` hands both to
`deepspeed.initialize`, builds the EMA from the weights DeepSpeed trains and compiles
the blocks; `TrainStep` takes one optimizer step of grad_accum micro-batches.

Precision (resolved once, `npp.runtime.settings.precision`, and handed to each part):
- bf16-mixed: fp32 weights, optimizer and gradient all-reduce; the model's own forward
  runs under bf16 autocast (`GPT.autocast_dtype`). The autocast is opened inside the
  module because DeepSpeed 0.19's `engine.forward` runs the module under
  `torch.autocast(enabled=False)` when it finds an autocast open around it and its
  config has no `torch_autocast` section: an autocast around the engine call trained
  in fp32 on every GPU (its check reads CUDA's autocast state, so CPU runs never showed it).
- bf16: DeepSpeed's bf16 (bf16 weights, fp32 master weights); no autocast.
- fp32: neither.
On CUDA, TF32 is on for whatever matmuls stay fp32 (FID features turn it off for themselves).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from npp.models.configs import GPTConfig, count_parameters
from npp.models.gpt import GPT, configure_optimizer_groups
from npp.runtime import settings
from npp.runtime.devices import fast_matmul
from npp.train.config import TrainConfig
from npp.train.ema import EMA, PartitionedEMA, make_ema
from npp.train.plan import EngineSettings, OptimizerSettings


def offloads_optimizer(ds_config: dict) -> bool:
    device = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in ("none", None)


def check_no_stale_build(ds_config: dict) -> None:
    """A lock left by an interrupted JIT build of DeepSpeed's cpu_adam op (offloaded optimizer) would make every
    start wait on it forever: refused with the file to delete."""
    from npp.train.distributed import stale_extension_locks
    from npp.train.errors import TrainingError

    stale = stale_extension_locks(["cpu_adam"]) if offloads_optimizer(ds_config) else []
    if stale:
        raise TrainingError(f"{stale[0]} is left by an interrupted build of DeepSpeed's cpu_adam op: every start "
                            "would wait on it forever. If no build is running on any node, delete it and rerun")


def compiles(value, device: torch.device, zero_stage: int) -> bool:
    """auto: compile on CUDA; on: on any device (the CPU tests); off: eager. Never under ZeRO-3, whose
    parameter-gathering hooks run around every submodule (DeepSpeed compiles those through its own backend)."""
    on = settings.switched_on(value, auto=device.type == "cuda")
    return on and zero_stage != 3


def build_model_and_optimizer(model_cfg: GPTConfig, engine_settings: EngineSettings, optim: OptimizerSettings,
                              device: torch.device, precision: str, offload: bool = False):
    """The GPT on its device, then AdamW over its parameters there.

    The optimizer is built after the move: a fused AdamW over CPU parameters fails on
    older torch (kept with SYSTEM_SITE=1), and its state must live where the weights do.
    With the optimizer offloaded (ZeRO-Offload) DeepSpeed requires its own CPU Adam
    (`zero_force_ds_cpu_optimizer`): DeepSpeedCPUAdam in AdamW mode, same groups.
    """
    model = GPT(model_cfg).to(device)
    model.activation_checkpointing = engine_settings.activation_checkpointing
    model.autocast_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    groups = configure_optimizer_groups(model, optim.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return model, DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, adamw_mode=True)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=device.type == "cuda")
    return model, optimizer


def start_engine(model: GPT, optimizer, ds_config: dict, engine_settings: EngineSettings, precision: str,
                 device: torch.device, keep_ema: bool, scheduler=None):
    """deepspeed.initialize, then the EMA (partitioned over the ranks under ZeRO-1/2, else held by the rank
    `keep_ema` says), then the compiled blocks.

    Returns (engine, ema or None, compiled). The EMA copies the module before it is
    compiled, from the weights DeepSpeed trains (see npp.train.ema).
    """
    import deepspeed

    fast_matmul(device)  # TF32 for fp32 matmuls on CUDA
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    ema = (make_ema(engine, engine_settings.ema_decay, keep=keep_ema, master_weights=precision != "bf16")
           if engine_settings.ema else None)
    compiled = compiles(engine_settings.compile, device, ds_config.get("zero_optimization", {}).get("stage", 0))
    if compiled:
        engine.module.compile_blocks()
    return engine, ema, compiled


class TrainStep:
    """One optimizer step: forward, backward and DeepSpeed's step per micro-batch, then the EMA.

    Returns this rank's mean loss, still on the device (nothing here makes the host wait
    for the GPU), or None when DeepSpeed skipped the update because a gradient was not
    finite (then the EMA is not updated either; see npp.train.bad_steps).
    """

    def __init__(self, engine, ema: EMA | PartitionedEMA | None):
        self.engine, self.ema = engine, ema

    def __call__(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], patch_side: int):
        losses = []
        for idx, labels in micro_batches:
            _, loss = self.engine(idx, labels, targets=idx, patch=patch_side)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        if not self.engine.was_step_applied():
            return None
        if self.ema is not None:
            self.ema.update(self.engine.module)
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def standalone_step(model_cfg: GPTConfig, cfg: TrainConfig, device: torch.device, seed: int = 0) -> TrainStep:
    """npp's step outside a run (gpu-check, benches, tests), in the process group's world: the DeepSpeed config, model,
    optimizer, engine, EMA and compiled blocks exactly as the trainer builds them. The process group must
    exist (npp.train.distributed.init). `step.engine.destroy()` frees DeepSpeed's hooks and buffers."""
    from npp.train.ds_config import build_ds_config

    precision = settings.precision(cfg.precision, device.type == "cuda", training=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    ds = build_ds_config(cfg, world, device.type == "cuda", precision, params=count_parameters(model_cfg))
    torch.manual_seed(seed)
    engine_settings, optim = settings_of(cfg)
    model, optimizer = build_model_and_optimizer(model_cfg, engine_settings, optim, device, precision,
                                                 offload=offloads_optimizer(ds))
    engine, ema, _ = start_engine(model, optimizer, ds, engine_settings, precision, device, keep_ema=True)
    return TrainStep(engine, ema)


def settings_of(cfg: TrainConfig) -> tuple[EngineSettings, OptimizerSettings]:
    """The engine's and the optimizer's settings of a config, as a training plan makes them (warmup aside: a step
    outside a run has no schedule), for a step built outside a run."""
    return EngineSettings.of(cfg), OptimizerSettings.of(cfg, steps_per_epoch=1)
