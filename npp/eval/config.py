"""The sample stage's typed config (torch-free, so the CLI can check flags before importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from npp.errors import UsageError
from npp.pipeline.eval_spec import EvalSpec


@dataclass
class SampleConfig:
    ckpt: str
    vq: str
    out: str
    per_class: int = 50
    cfg_scale: Union[float, str] = 2.0  # one scale, or several: "1.5,2.0,2.5" / [1.5, 2.0] (a sweep)
    # samples per piece; 0: the largest the free GPU memory holds (KV cache formula, at most 256), 64 on CPU
    batch: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_interval: int = -1
    seed: int = 0
    labels: str = "balanced"  # balanced: per_class of every class; random: num_samples uniform labels
    num_samples: int = 0  # for --labels random (default per_class x classes)
    ema: bool = False  # sample with the EMA weights when the checkpoint has them
    grid_classes: int = 16  # rows of the PNG grid
    grid_per_class: int = 8
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (weights and KV cache in bf16; logits and sampling in fp32)
    compile: str = "auto"  # the token step compiled and captured as a CUDA graph: auto = on CUDA; off = eager


@dataclass
class WatchConfig(EvalSpec):
    """`npp eval watch`: the evaluation of `npp train --eval-every` (EvalSpec's flags, unprefixed) on each new
    complete checkpoint of a run, outside the training job."""

    run: str = ""  # the training run folder (npp train --out)
    ema: bool = True  # evaluate the EMA weights when a checkpoint has them
    interval: float = 300.0  # seconds between looks for new checkpoints
    once: bool = False  # evaluate what is there now, then stop

    def validate(self) -> None:
        if not self.run:
            raise UsageError("npp eval watch needs --run RUN (the training run's folder)")
        super().validate()
