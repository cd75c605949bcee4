"""The train stage's typed config: every flag has one name, one default and one meaning (its `flag(...)`).

Defaults follow LlamaGen/NPP c2i training (docs/method.md); where the NPP paper's
appendix and its code differ (warmup epochs, attention dropout) the paper wins.
`check_values()` refuses values that cannot work; everything that needs a file (the DeepSpeed
JSON, the shard set, the run folder) is checked by npp.train.plan, which turns a config into
the resolved plan the trainer runs. Which flags define a run and which may change on resume
is said once, on each flag here (`identity=True`), and applied by npp.train.identity. This module
imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from npp.errors import UsageError
from npp.models.configs import GPT_SIZES
from npp.pipeline.eval_spec import RUN_FILES, EvalSpec
from npp.runtime import settings
from npp.runtime.flags import Checked, documented, flag, flag_of, need
from npp.runtime.mlflow_utils import EXPERIMENT

DEFAULT_SCHEDULE = "4:0.25,2:0.25,1:0.5"  # the paper's 3-level schedule of the budget
DEFAULT_DS_CONFIG = "ds_configs/zero2.json"
# The evaluation during training is EvalSpec's, declared there once: its flags here are `--eval-` + its names, except
# the run's own files (RUN_FILES: the tokenizer, the feature network); its seed is the run's.
EVAL_PREFIXED = tuple(f.name for f in dataclasses.fields(EvalSpec) if f.name not in (*RUN_FILES, "seed"))


@documented
@dataclass(frozen=True)
class TrainConfig:
    """The flags of `npp train`: what a run is (fixed at its first start) and how this start runs it."""

    shards: str = flag(help="shard-set directory written by `npp tokenize run`; several: 'A,B' or a glob (same "
                            "tokenizer)")
    out: str = flag(help="run directory: checkpoints, exported model, config.json, metrics.jsonl; a rerun resumes it")
    model: str = flag("GPT-B", "model size (`npp models` lists them)", choices=tuple(GPT_SIZES), identity=True)
    schedule: str = flag(DEFAULT_SCHEDULE, "patch_side:share,... of the training budget; '1:1' is the next-token "
                                           "baseline", identity=True)
    patch_levels: int = flag(0, ">0: the paper's schedule (sides 2^(L-1)..1) instead of --schedule", identity=True)
    epoch_rate: float = flag(0.5, "the paper's stage boundary rate for --patch-levels", identity=True)
    epochs: int = flag(300, "passes over the shard set (the budget, with --global-batch)", identity=True)
    total_steps: int | None = flag(None, "optimizer steps in all (default: epochs x steps per epoch)", identity=True)
    global_batch: int = flag(256, "samples per optimizer step, all ranks together", identity=True)
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step (may change on resume)")
    lr: float = flag(1e-4, "peak learning rate", identity=True)
    end_lr: float = flag(1e-5, "learning rate at the end of each stage's linear decay", identity=True)
    warmup_epochs: float = flag(5.0, "linear warmup at the start of every stage, in epochs (paper appendix; "
                                     "reference code: 1)", identity=True)
    decay_ratio: float = flag(0.2, "last share of each stage that decays linearly to --end-lr", identity=True)
    weight_decay: float = flag(0.05, "AdamW weight decay on matrices and embeddings (every tensor of 2 or more "
                                          "dimensions), not on norms (LlamaGen's rule)", identity=True)
    beta1: float = flag(0.9, "AdamW beta1", identity=True)
    beta2: float = flag(0.95, "AdamW beta2", identity=True)
    grad_clip: float = flag(1.0, "global gradient-norm clip", identity=True)
    precision: str = flag("auto", "auto = bf16-mixed on CUDA, fp32 on CPU; bf16-mixed: fp32 weights, bf16 "
                                  "autocast; bf16: DeepSpeed bf16", choices=("auto", "bf16-mixed", "bf16", "fp32"),
                          identity=True)
    ds_config: str = flag(DEFAULT_DS_CONFIG, "DeepSpeed JSON (how to shard: ZeRO stage, buckets, offload), relative "
                                             "to the working directory or to npp's checkout")
    grad_comm: str = flag("auto", "dtype of the gradient reduction across ranks: auto = the DeepSpeed JSON's "
                                  "communication_data_type, else fp32; bf16 halves its bytes (rounds each reduced "
                                  "gradient to bf16)", choices=("auto", "fp32", "bf16"))
    ema: bool = flag(False, "keep an exponential moving average of the weights (exported beside them)", identity=True)
    ema_decay: float = flag(0.9999, "EMA decay per step", identity=True)
    token_dropout: float = flag(0.1, "dropout on the input embeddings", identity=True)
    resid_dropout: float = flag(0.1, "dropout on attention outputs", identity=True)
    ffn_dropout: float = flag(0.1, "dropout in the feed-forward blocks", identity=True)
    attn_dropout: float = flag(0.1, "attention-probability dropout (paper appendix; reference code: 0)", identity=True)
    drop_path: float = flag(0.0, "stochastic depth rate of the last block (linear in depth)", identity=True)
    class_dropout: float = flag(0.1, "share of class labels replaced by the null class (for guidance)", identity=True)
    seed: int = flag(0, "seed of weights, data order and dropout", identity=True)
    workers: int = flag(-1, "DataLoader workers per rank; -1 = auto (SLURM's CPUs per rank - 1, else 4, at most "
                            "the shards per rank)")
    shuffle_buffer: int = flag(5000, "samples in the shuffle buffer over the data order (order 1: each loader "
                                     "worker's)", identity=True)
    mix_shards: int = flag(-1, "shards whose samples are mixed at once, in a random order; -1: 256 (16 for a run "
                                "begun in data order 1, where each loader worker reads its own)", identity=True)
    log_every: int = flag(50, "steps between log lines and MLflow points")
    ckpt_every: int = flag(1000, "steps between checkpoints (also saved on SIGTERM/SIGUSR1, a STOP file and at the "
                                 "end)")
    keep: int = flag(3, "checkpoints kept")
    branch_epochs: str = flag("", "epoch counts below --epochs, e.g. '16,18,24' (single-stage schedules): keep, beyond "
                                  "--keep, the checkpoint where each shorter run's decay begins, so `npp train branch` "
                                  "trains that shorter run's decay alone (the compute-matched NTP baselines)")
    max_bad_steps: int = flag(5, "consecutive steps skipped for non-finite gradients before stopping with an error")
    sync_every: int = flag(10, "steps between host reads of the losses and stop agreement")
    collective_timeout: float = flag(1800.0, "seconds a rank may go without an optimizer step or a save (and a "
                                             "collective may wait) before the job ends naming the stalled rank, "
                                             "exit 3 (sbatch requeues it); sized for a GPT-XXL checkpoint save")
    experiment: str = flag(EXPERIMENT, "MLflow experiment", identity=True)
    run_name: str = flag("", "MLflow run name (default: what defines the run, e.g. 'GPT-B NPP 4:0.25 2:0.25 1:0.5 "
                             "300ep s0', 'GPT-B NTP 173ep s0 (branch of gpt-b-ntp)')", identity=True)
    tracking: bool = flag(True, "log to MLflow (rank 0); --notracking turns it off")
    compile: str = flag("auto", "torch.compile each transformer block: auto = on CUDA; off (--nocompile) = eager; "
                                "on = any device", choices=("auto", "on", "off"))
    eval_every: int = flag(0, "steps between FID evaluations during training (also at the last step); 0 = none")
    eval_every_epochs: float = flag(0.0, "the same in epochs (when --eval-every is 0)")
    eval_per_class: int = flag_of(EvalSpec, "per_class", "samples per class at each eval point (fixed labels and "
                                                          "seeds)")
    eval_cfg_scale: float = flag_of(EvalSpec, "cfg_scale", "classifier-free guidance scale of the eval samples")
    eval_cfg: float | None = flag(None, "the old spelling of --eval-cfg-scale (wins when given)")
    eval_temperature: float = flag_of(EvalSpec, "temperature", "sampling temperature of the eval samples")
    eval_top_k: int = flag_of(EvalSpec, "top_k", "top-k of the eval samples (0 = all)")
    eval_batch: int = flag_of(EvalSpec, "batch", "samples per sampling batch at the eval points")
    eval_ref: str = flag_of(EvalSpec, "ref")
    inception: str = flag_of(EvalSpec, "inception")
    classifier: str = flag_of(EvalSpec, "classifier")
    vq: str = flag_of(EvalSpec, "vq", "the tokenizer the shards were made with (decodes the eval samples)")
    activation_checkpointing: bool = flag(False, "recompute each block in backward: larger micro-batches "
                                                 "(GPT-XXL/XXXL)")
    allow_change: str = flag("", "defining flags this start may change on purpose, comma-separated (e.g. 'lr' "
                                 "after non-finite steps): recorded in config.json and as MLflow amended.* tags")

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

    def eval_spec(self) -> EvalSpec:
        """The evaluation of the eval points, from its flags (EVAL_PREFIXED, RUN_FILES) and the run's seed."""
        values = {name: getattr(self, "eval_" + name) for name in EVAL_PREFIXED}
        values.update({name: getattr(self, name) for name in RUN_FILES})
        if self.eval_cfg is not None:
            values["cfg_scale"] = float(self.eval_cfg)
        return EvalSpec(**values, seed=int(self.seed))

    def branch_epoch_list(self) -> list[int]:
        """--branch-epochs as whole numbers of epochs, sorted (a UsageError names a word that is not one)."""
        out = []
        for word in str(self.branch_epochs).replace(";", ",").split(","):
            if not word.strip():
                continue
            try:
                out.append(int(word.strip()))
            except ValueError:
                raise UsageError(f"--branch-epochs {self.branch_epochs!r}: {word.strip()!r} is not a whole number of "
                                 "epochs (write e.g. 16,18,24)") from None
        return sorted(set(out))

    def check_values(self) -> None:
        """Refuse values that cannot work, naming the flag and the fix (no file is read)."""
        need(bool(self.shards), "--shards is empty: pass the shard-set directory (`npp tokenize run --out`)")
        need(bool(self.out), "--out is empty: pass the run directory")
        for name in ("log_every", "ckpt_every", "sync_every", "grad_accum", "max_bad_steps", "keep", "global_batch",
                     "epochs"):
            value = getattr(self, name)
            need(int(value) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
        need(self.total_steps is None or int(self.total_steps) >= 1,
             f"--total-steps must be at least 1, got {self.total_steps}")
        need(float(self.collective_timeout) >= 10, f"--collective-timeout must be at least 10 s, got "
             f"{self.collective_timeout}")
        need(int(self.workers) >= -1, f"--workers must be >= 0 (or -1 for auto), got {self.workers}")
        need(int(self.mix_shards) == -1 or int(self.mix_shards) >= 1,
             f"--mix-shards must be at least 1 (or -1 for the data order's default), got {self.mix_shards}")
        need(int(self.shuffle_buffer) >= 1, f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}")
        need(self.lr > 0 and self.end_lr >= 0, f"--lr must be > 0 and --end-lr >= 0, got {self.lr} and {self.end_lr}")
        need(0 < self.ema_decay < 1, f"--ema-decay must lie in (0, 1), got {self.ema_decay}")
        for name in ("token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout", "drop_path", "class_dropout"):
            value = getattr(self, name)
            need(0 <= value < 1, f"--{name.replace('_', '-')} must lie in [0, 1), got {value}")
        settings.precision(self.precision, cuda=False, training=True)  # a word it knows (resolved by the plan)
        need(self.model in GPT_SIZES, f"--model {self.model!r} is not a model size: one of {', '.join(GPT_SIZES)}")
        settings.switch(self.compile)
        need(int(self.eval_every) >= 0 and float(self.eval_every_epochs) >= 0, "--eval-every must be >= 0")
        need(int(self.patch_levels) >= 0, f"--patch-levels must be >= 0, got {self.patch_levels}")
        self.branch_epoch_list()

    def plan(self, world_size: int | None = None):
        """The run checked and resolved (npp.train.plan.make_plan) for a job of `world_size` ranks (default: this
        one's)."""
        from npp.train.plan import make_plan

        return make_plan(self, world_size)


@documented
@dataclass(frozen=True)
class BranchConfig:
    """The flags of `npp train branch`."""

    from_: str = flag(help="the parent run's directory (npp train --out, started with --branch-epochs)")
    epochs: int = flag(help="the branch's epochs (one of the parent's --branch-epochs)")
    out: str = flag(help="the branch's run directory")
    shards: str = flag("", "the shard set, if it moved (default: the parent's)")
    run_name: str = flag("", "MLflow run name (default: the model, NTP, its epochs and seed, and whose branch it is)")
    tracking: bool = flag(True, "log to MLflow (--notracking: not)")
    log_every: int = flag(0, "steps between log lines (0: the parent's)")
    ckpt_every: int = flag(0, "steps between checkpoints (0: the parent's)")
    eval_every_epochs: float = flag(-1.0, "FID evaluations during training, in epochs (-1: the parent's)")
    eval_per_class: int = flag(0, "samples per class at each eval point (0: the parent's)")
    world_size: int = flag(0, "with --check: plan for this many ranks")
    check: bool = flag(False, "check the branch as its start would (no torch, nothing written), then stop")

    def plan(self):
        """The branch's training plan (npp.train.plan.TrainPlan), its config made from the parent's
        (npp.train.branching.branch_config) with these flags over it."""
        from npp.train.branching import branch_config
        from npp.train.plan import make_plan

        overrides = {k: v for k, v in {"shards": self.shards, "run_name": self.run_name, "log_every": self.log_every,
                                       "ckpt_every": self.ckpt_every, "eval_per_class": self.eval_per_class}.items()
                     if v}
        if self.eval_every_epochs >= 0:
            overrides["eval_every_epochs"] = self.eval_every_epochs
        if not self.tracking:
            overrides["tracking"] = False
        cfg, record = branch_config(self.from_, self.epochs, self.out, overrides)
        return make_plan(cfg, self.world_size or None, branch=record)


@documented
@dataclass(frozen=True)
class ExportConfig(Checked):
    """The flags of `npp train export`."""

    run: str = flag(help="the run directory (npp train --out)")
    tag: str = flag("", "a checkpoint of the run (step_000001000; default: the latest)")
    out: str = flag("", "where to write it (default: RUN/model.pt)")

    def validate(self) -> None:
        from npp.pipeline.inputs import check_run_checkpoint

        check_run_checkpoint(self.run, self.tag)


@documented
@dataclass(frozen=True)
class ConvertConfig(Checked):
    """The flags of `npp train convert`."""

    run: str = flag(help="the run directory (npp train --out)")

    def validate(self) -> None:
        from npp.pipeline.inputs import check_run_checkpoint

        check_run_checkpoint(self.run)


@documented
@dataclass(frozen=True)
class ModelsConfig(Checked):
    """The flags of `npp models`."""

    vocab_size: int = flag(16384, "codebook size of the tokenizer (LlamaGen's: 16384)")
    num_classes: int = flag(1000, "class labels (ImageNet: 1000)")
    block_size: int = flag(256, "tokens per image (256 px / 16 = 16 x 16 = 256)")

    def validate(self) -> None:
        need(min(self.vocab_size, self.num_classes, self.block_size) >= 1,
             "--vocab-size, --num-classes and --block-size must be at least 1")


@documented
@dataclass(frozen=True)
class ScheduleConfig:
    """The flags of `npp schedule`."""

    schedule: str = flag("", "patch_side:share,... (as `npp train --schedule`; default 1:1)")
    patch_levels: int = flag(0, ">0: the paper's schedule with this many levels instead")
    epoch_rate: float = flag(0.5, "the paper's stage boundary rate for --patch-levels")
    epochs: int = flag(300, "the training budget in epochs")
    steps_per_epoch: int = flag(5004, "optimizer steps per epoch (ImageNet at batch 256: 5004)")
    model: str = flag("GPT-B", "model size the cost is computed for", choices=tuple(GPT_SIZES))
    block_size: int = flag(256, "tokens per image")

    def plan(self) -> SchedulePlan:
        """The schedule laid out over the budget, for the model; a bad schedule is one line."""
        from npp.models.configs import gpt_config
        from npp.train.schedule import PatchSchedule, paper_schedule, parse_schedule

        need(self.epochs >= 1 and self.steps_per_epoch >= 1, "--epochs and --steps-per-epoch must be at least 1")
        model_cfg = gpt_config(self.model, block_size=self.block_size)
        stages = (paper_schedule(self.patch_levels, self.epoch_rate, self.epochs) if self.patch_levels
                  else parse_schedule(self.schedule or "1:1", model_cfg.grid))
        return SchedulePlan(self.model, model_cfg, PatchSchedule(stages, self.epochs * self.steps_per_epoch),
                            self.epochs, self.steps_per_epoch)


@dataclass(frozen=True)
class SchedulePlan:
    """What `npp schedule` shows: a schedule over a budget, for a model."""

    model: str
    model_cfg: Any  # GPTConfig
    schedule: Any  # npp.train.schedule.PatchSchedule
    epochs: int
    steps_per_epoch: int
