"""The train stage's typed config: every knob has one name, one default, one help line.

Defaults follow LlamaGen/NPP c2i training (FACTS.md §3); where the NPP paper's
appendix and its code differ (warmup epochs, attention dropout) the paper wins.
The resolved config is saved in the run directory and logged to MLflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    shards: str  # shard-set directory written by `npp tokenize run`; several: "A,B" or a glob (same tokenizer)
    out: str  # run directory: checkpoints, exported model, config, metrics.jsonl
    model: str = "GPT-B"  # a size of npp.models.configs.GPT_SIZES
    schedule: str = "4:0.25,2:0.25,1:0.5"  # patch_side:share,...; "1:1" is the next-token baseline
    patch_levels: int = 0  # >0: the paper's schedule (sides 2^(L-1)..1) instead of --schedule
    epoch_rate: float = 0.5  # the paper's stage boundary rate for --patch-levels
    epochs: int = 300
    total_steps: Optional[int] = None  # optimizer steps in all; default epochs x steps per epoch
    global_batch: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    end_lr: float = 1e-5
    warmup_epochs: float = 5.0  # paper appendix (reference code: 1); restarts in every stage
    decay_ratio: float = 0.2  # last share of each stage decays linearly to end_lr
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16-mixed on CUDA, fp32 on CPU) | bf16-mixed | bf16 | fp32
    ds_config: str = "ds_configs/zero2.json"
    ema: bool = False
    ema_decay: float = 0.9999
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.1  # paper appendix (reference code: 0)
    drop_path: float = 0.0
    class_dropout: float = 0.1
    seed: int = 0
    workers: int = 4  # DataLoader workers per rank (default from SLURM_CPUS_PER_TASK when set)
    shuffle_buffer: int = 5000
    mix_shards: int = 16  # shards each loader worker reads at once, in a random order of their samples
    log_every: int = 50
    ckpt_every: int = 1000  # steps between checkpoints (also saved on SIGTERM/SIGUSR1 and at the end)
    keep: int = 3  # checkpoints kept
    max_bad_steps: int = 5  # consecutive steps skipped for non-finite gradients before stopping with an error
    sync_every: int = 10  # steps between host reads of losses and stop agreement (also at log/ckpt/eval steps)
    experiment: str = "npp"  # MLflow experiment
    run_name: str = ""  # MLflow run name (default: the run directory's name)
    tracking: bool = True  # log to MLflow (rank 0)
    compile: str = "auto"  # torch.compile each transformer block: auto = on CUDA; off (--nocompile) = eager; on = any device
    # FID during training (see npp.eval.during_training): 0 = off
    eval_every: int = 0  # steps between evaluations (also at the last step)
    eval_every_epochs: float = 0.0  # the same in epochs (when eval_every is 0)
    eval_per_class: int = 10  # samples per class at each eval point (fixed labels and seeds)
    eval_cfg: float = 2.0  # classifier-free guidance scale of the eval samples
    eval_temperature: float = 1.0
    eval_top_k: int = 0
    eval_batch: int = 64
    eval_ref: str = ""  # reference statistics (.npz from `npp eval ref`, or ADM's batch with --inception)
    inception: str = ""  # FID Inception weights (pt_inception-2015-12-05-6726825d.pth)
    classifier: str = ""  # or a toy classifier (npp eval fit-classifier) as the feature network
    vq: str = ""  # the tokenizer the shards were made with (decodes the eval samples)
    activation_checkpointing: bool = False  # recompute each block in backward: larger micro-batches (GPT-XXL/XXXL)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
