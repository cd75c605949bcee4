"""The train stage's typed config: every knob has one name, one default, one help line.

Defaults follow LlamaGen/NPP c2i training (docs/method.md); where the NPP paper's
appendix and its code differ (warmup epochs, attention dropout) the paper wins.
The resolved config is saved in the run directory and logged to MLflow.

`validate()` checks everything that needs no torch (numbers, choices, the DeepSpeed
JSON, the schedule against the shard set's grid, the world size, the eval inputs)
before the CLI imports torch and DeepSpeed: a wrong flag fails in a fraction of a
second with a line naming it. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from npp.errors import UsageError

COMPILE_ON = ("true", "on", "1", "yes")
COMPILE_OFF = ("false", "off", "0", "no", "none", "")


def compile_setting(value) -> str:
    """--compile as one of auto | on | off (fire gives True/False for --compile/--nocompile)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in COMPILE_ON:
        return "on"
    if text in COMPILE_OFF:
        return "off"
    raise UsageError(f"--compile must be auto, on or off (or --nocompile), got {value!r}")


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
    # torch.compile each transformer block: auto = on CUDA; off (--nocompile) = eager; on = any device
    compile: str = "auto"
    # FID during training (see npp.eval.during_training): 0 = off. The eval_* flags are EvalSpec's
    # (npp.pipeline.eval_spec), the names `npp eval watch` takes, with an eval- prefix.
    eval_every: int = 0  # steps between evaluations (also at the last step)
    eval_every_epochs: float = 0.0  # the same in epochs (when eval_every is 0)
    eval_per_class: int = 10  # samples per class at each eval point (fixed labels and seeds)
    eval_cfg_scale: float = 2.0  # classifier-free guidance scale of the eval samples
    eval_cfg: Optional[float] = None  # the old spelling of --eval-cfg-scale (wins when given)
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

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_every) or float(self.eval_every_epochs) > 0

    def eval_interval(self, steps_per_epoch: int) -> int:
        """Steps between evaluations, the one place it is computed: --eval-every, or --eval-every-epochs
        rounded to whole steps and never below 1 (0 only when there is no evaluation)."""
        if self.eval_every:
            return int(self.eval_every)
        if float(self.eval_every_epochs) > 0:
            return max(1, round(float(self.eval_every_epochs) * max(1, steps_per_epoch)))
        return 0

    def eval_spec(self):
        """The evaluation of the eval points (npp.pipeline.eval_spec.EvalSpec)."""
        from npp.pipeline.eval_spec import EvalSpec

        return EvalSpec(vq=self.vq, ref=self.eval_ref, inception=self.inception, classifier=self.classifier,
                        per_class=int(self.eval_per_class),
                        cfg_scale=float(self.eval_cfg if self.eval_cfg is not None else self.eval_cfg_scale),
                        temperature=float(self.eval_temperature), top_k=int(self.eval_top_k),
                        batch=int(self.eval_batch), seed=int(self.seed))

    def validate(self) -> None:
        """Refuse what cannot work, naming the flag and the fix; no torch, no DeepSpeed, nothing written."""
        from npp.models.configs import gpt_config
        from npp.pipeline.ranks import rank_and_world
        from npp.pipeline.shards import read_meta, resolve_shard_dirs
        from npp.train.ds_config import PRECISIONS, check_skips_non_finite, load_ds_json, micro_batch
        from npp.train.schedule import paper_schedule, parse_schedule

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        for flag in ("log_every", "ckpt_every", "sync_every", "grad_accum", "max_bad_steps", "keep", "global_batch",
                     "epochs"):
            value = getattr(self, flag)
            need(int(value) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        need(self.total_steps is None or int(self.total_steps) >= 1, f"--total-steps must be at least 1, got "
             f"{self.total_steps}")
        need(int(self.workers) >= -1, f"--workers must be >= 0 (or -1 for the default), got {self.workers}")
        need(self.lr > 0 and self.end_lr >= 0, f"--lr must be > 0 and --end-lr >= 0, got {self.lr} and {self.end_lr}")
        need(0 < self.ema_decay < 1, f"--ema-decay must lie in (0, 1), got {self.ema_decay}")
        for flag in ("token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout", "drop_path", "class_dropout"):
            value = getattr(self, flag)
            need(0 <= value < 1, f"--{flag.replace('_', '-')} must lie in [0, 1), got {value}")
        need(self.precision == "auto" or self.precision in PRECISIONS,
             f"--precision must be auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
        compile_setting(self.compile)
        gpt_config(self.model)  # a known size
        ds = load_ds_json(self.ds_config)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        need(stage in (0, 1, 2, 3), f"{self.ds_config}: zero_optimization.stage must be 0-3, got {stage}")
        if self.precision != "auto":
            check_skips_non_finite(ds, stage, self.precision, self.ds_config)
        need(not (self.ema and stage == 3), "--ema with ZeRO-3 is not supported (parameters are partitioned): use "
             "ZeRO-1/2 or drop --ema")
        micro_batch(self, rank_and_world()[1])
        dirs = resolve_shard_dirs(str(self.shards))
        meta = read_meta(dirs[0])
        if self.patch_levels:
            paper_schedule(int(self.patch_levels), float(self.epoch_rate), int(self.epochs))
        else:
            parse_schedule(str(self.schedule), tuple(meta["grid"]) if "grid" in meta else None)
        need(int(self.eval_every) >= 0 and float(self.eval_every_epochs) >= 0, "--eval-every must be >= 0")
        if self.evaluates:
            need(stage != 3, "--eval-every with ZeRO-3 is not supported (the weights are partitioned): use ZeRO-1/2, "
                 "or evaluate the checkpoints afterwards with `npp sample` + `npp eval`")
            try:
                self.eval_spec().validate(prefix="eval-")
            except UsageError as e:
                raise UsageError(f"--eval-every: {e}") from None
