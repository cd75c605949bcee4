"""A training run checked once, into the plan the trainer runs (torch-free).

`make_plan(cfg)` reads every input that can be read without torch, refuses what cannot work
with one line naming the flag or file and the fix, and resolves everything the trainer needs:
the DeepSpeed JSON and its ZeRO stage, the micro-batch, the shard set's metadata and manifest,
the model config, the schedule and its step budget, the eval interval and spec, the loader
workers, the checkpoint to resume from and whether the run folder's identity allows this start
(npp.train.identity). The CLI makes it before importing torch (`npp train`, and `npp train check`
on a login node or at the top of an sbatch script); `Trainer` consumes it and checks nothing
again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from npp.errors import UsageError
from npp.models.configs import GPTConfig, count_parameters, gpt_config
from npp.pipeline.eval_spec import EvalSpec
from npp.pipeline.global_order import ORDER
from npp.pipeline.runs import RunFolder, tag_for, tag_step
from npp.pipeline.shards import heldout_shards, is_shard_set, manifest_digest, open_shard_sets
from npp.runtime import settings
from npp.runtime.metric_names import NAMING
from npp.runtime.ranks import rank_and_world
from npp.runtime.workers import slurm_workers
from npp.train.cadence import Cadence
from npp.train.config import TrainConfig
from npp.train.ds_config import (
    check_ds_json,
    device_ds_config,
    load_ds_json,
    micro_batch,
    replaced_keys,
    resolve_ds_path,
)
from npp.train.errors import TrainingError
from npp.train.identity import check_same_run, identity_of, mutable_changes
from npp.train.schedule import (
    PatchSchedule,
    Stage,
    branch_points,
    format_schedule,
    paper_schedule,
    parse_schedule,
    warmup_steps,
)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its learning-rate curve (npp.train.step builds the one, the trainer's scheduler follows the other)."""

    lr: float
    end_lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int  # at the start of every stage
    decay_ratio: float

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> OptimizerSettings:
        return cls(float(cfg.lr), float(cfg.end_lr), (float(cfg.beta1), float(cfg.beta2)), float(cfg.weight_decay),
                   warmup_steps(float(cfg.warmup_epochs), steps_per_epoch), float(cfg.decay_ratio))


@dataclass(frozen=True)
class EngineSettings:
    """How the model is built and stepped (npp.train.step): the precision as the flag names it (auto is resolved for
    the device when the process starts: the plan is made before torch), compiled blocks, recompute, the EMA."""

    precision: str
    compile: str  # auto | on | off (npp.runtime.settings)
    activation_checkpointing: bool
    ema: bool
    ema_decay: float

    @classmethod
    def of(cls, cfg: TrainConfig) -> EngineSettings:
        return cls(str(cfg.precision), settings.switch(cfg.compile), bool(cfg.activation_checkpointing),
                   bool(cfg.ema), float(cfg.ema_decay))


@dataclass(frozen=True)
class FeedSettings:
    """The data streams of every rank (npp.train.data_feed)."""

    shards: str
    manifest: tuple  # rows of the shard set(s)' manifests, with `path`
    shuffle_buffer: int
    mix_shards: int  # resolved for the data order
    micro_batch: int
    workers: int  # loader workers per rank, resolved
    order: int  # 2: npp.pipeline.global_order; 1: npp.pipeline.stream's, for runs begun before it


@dataclass(frozen=True)
class LoopSettings:
    """The optimizer step's batch and the loop's bounds."""

    global_batch: int
    grad_accum: int
    grad_clip: float
    grad_comm: str
    max_bad_steps: int
    collective_timeout: float  # seconds: the watchdog's and the process group's
    keep: int  # checkpoints kept


@dataclass(frozen=True)
class TrackingSettings:
    enabled: bool
    experiment: str
    run_name: str  # "": the run's default name (npp.train.run_record)


@dataclass(frozen=True)
class TrainPlan:
    """Everything a start runs, resolved and checked (make_plan); frozen: nothing decides again after it. The flags
    themselves are kept only as the run's record (config.json, MLflow's params and tags, the identity); what the
    trainer consumes are the typed parts below them."""

    flags: dict  # the flags as resolved (the record: config.json's "train"); nothing reads a setting from it
    identity: dict  # the run-defining values of this start (npp.train.identity)
    out: str  # the run folder
    model: str  # the model size's name
    seed: int  # weights, dropout, data order, eval samples: every seed derives from it
    world_size: int
    ds_path: str  # the DeepSpeed JSON, resolved
    ds_json: dict  # as loaded and checked (device settings are added at start: npp.train.ds_config)
    zero_stage: int
    meta: dict  # the shard set(s)' combined meta.json
    data_digest: str  # the shards' content: a digest of every shard's sha256
    model_cfg: GPTConfig
    stages: tuple[Stage, ...]
    steps_per_epoch: int
    total_steps: int
    cadence: Cadence  # when the loop syncs, logs, saves and evaluates
    optimizer: OptimizerSettings
    engine: EngineSettings
    feed: FeedSettings
    loop: LoopSettings
    tracking: TrackingSettings
    eval_spec: EvalSpec | None  # what the eval points sample and measure; None: no evaluation during training
    resume_tag: str | None  # the checkpoint this start resumes from
    mlflow_names: int = NAMING  # npp.runtime.metric_names: 1 for runs begun before `Results/`
    heldout: tuple = ()  # the held-out shards (--val-share of tokenize): val/loss_k1
    branch_steps: dict = field(default_factory=dict)  # --branch-epochs: {E': the step whose checkpoint is kept}
    branch: dict | None = None  # a branch run's record (npp.train.branching): parent, step, tag, epochs
    prepare_branch: bool = False  # this start first puts the parent's checkpoint into the run folder
    changes: dict = field(default_factory=dict)  # MUTABLE flags changed since the last start: {flag: (was, now)}
    amended: dict = field(default_factory=dict)  # defining flags changed on purpose (--allow-change)
    first_identity: dict = field(default_factory=dict)  # the identity of the run's first start
    starts: tuple = ()  # config.json's record of the earlier starts
    notes: tuple[str, ...] = ()  # what the plan decided that a user should read

    @property
    def schedule(self) -> PatchSchedule:
        return PatchSchedule(list(self.stages), self.total_steps)

    @property
    def micro_batch(self) -> int:
        return self.feed.micro_batch

    @property
    def data_order(self) -> int:
        return self.feed.order

    def device_ds_config(self, precision: str, cuda: bool) -> dict:
        """The DeepSpeed config this start hands to deepspeed.initialize (npp.train.ds_config.device_ds_config)."""
        loop = self.loop
        return device_ds_config(self.ds_json, micro=self.micro_batch, grad_accum=loop.grad_accum,
                                global_batch=loop.global_batch, grad_clip=loop.grad_clip, precision=precision,
                                cuda=cuda, grad_comm=loop.grad_comm, params=count_parameters(self.model_cfg))

    def describe(self) -> str:
        return (f"{self.model} on {self.meta['samples']} samples ({len(self.feed.manifest)} shards), schedule "
                f"{format_schedule(list(self.stages))}, {self.total_steps} steps ({self.steps_per_epoch}/epoch), "
                f"world {self.world_size} x micro-batch {self.micro_batch} x grad-accum {self.loop.grad_accum}, ZeRO-"
                f"{self.zero_stage} ({self.ds_path}), {self.feed.workers} loader workers per rank"
                + (f", resumes {self.resume_tag}" if self.resume_tag else ", a new run"))


def check_meta_matches(model_cfg: GPTConfig, meta: dict, shards: str) -> None:
    """The shard set must be tokenized for this model: same vocabulary, same grid, enough classes."""
    problems = []
    if meta["codebook_size"] != model_cfg.vocab_size:
        problems.append(f"codebook size {meta['codebook_size']} vs model vocab_size {model_cfg.vocab_size}")
    if tuple(meta["grid"]) != tuple(model_cfg.grid):
        problems.append(f"token grid {tuple(meta['grid'])} vs model grid {tuple(model_cfg.grid)}")
    if meta["num_classes"] > model_cfg.num_classes:
        problems.append(f"{meta['num_classes']} classes vs model num_classes {model_cfg.num_classes}")
    if problems:
        raise TrainingError(
            f"shard set {shards} does not fit the model: " + "; ".join(problems)
            + ". Train on shards made with this model's tokenizer and image size, or start a new --out run."
        )


def data_digest(manifest: list[dict]) -> str:
    return manifest_digest(manifest)


def auto_workers(requested: int, shards: int, world_size: int) -> int:
    """--workers -1: one per CPU SLURM gives each rank, less one for the rank itself (else 4), never more than the
    shards each rank owns (a worker without shards hangs the job)."""
    if requested >= 0:
        return requested
    from_slurm = slurm_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0) or 1)
    wanted = min(8, from_slurm) if from_slurm else 4
    return max(1, min(wanted, shards // max(1, world_size)))


def check_run_folder(run: RunFolder) -> None:
    """--out is a run folder or a new/empty directory; not a file, a shard set, or another project's folder."""
    path = run.path
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file: pass a directory for the run (a new one starts a run)")
    if is_shard_set(path):
        raise UsageError(f"--out {path} is a shard set: pass a run directory (e.g. runs/NAME), not --shards' folder")


def model_config_for(cfg: TrainConfig, meta: dict, saved: dict | None = None) -> GPTConfig:
    """The GPT `npp train` builds for these flags and this shard set's meta (grid, codebook, classes): dropout
    and drop path included; a resumed run's saved config as it is."""
    if saved and saved.get("model_config"):  # a resumed run keeps the model it was started with (identity checked)
        return GPTConfig.from_dict(saved["model_config"])
    h, w = meta["grid"]
    return gpt_config(cfg.model, vocab_size=meta["codebook_size"], block_size=h * w, grid=(h, w),
                      num_classes=meta["num_classes"], token_dropout_p=cfg.token_dropout,
                      resid_dropout_p=cfg.resid_dropout, ffn_dropout_p=cfg.ffn_dropout,
                      attn_dropout_p=cfg.attn_dropout, drop_path_rate=cfg.drop_path,
                      class_dropout_prob=cfg.class_dropout)


def resume_tag(run: RunFolder, world_size: int) -> str | None:
    """The tag a start will resume from; refuses a ZeRO checkpoint of another world size."""
    tag = run.latest_tag()
    if tag is None or run.is_universal(tag):
        return tag
    saved = run.saved_world_size(tag)
    if saved != world_size:
        raise TrainingError(
            f"{run.tag_dir(tag)} was saved by {saved} ranks, this job has {world_size}: run "
            f"`npp train convert --run {run.path}` (DeepSpeed's universal checkpoint), then start again "
            "with any number of ranks; or resume with the same world size"
        )
    return tag


def make_plan(cfg: TrainConfig, world_size: int | None = None, branch: dict | None = None) -> TrainPlan:
    """Check a training run and resolve it (see the module's docstring); world_size defaults to this job's.
    `branch`: the record of `npp train branch` (npp.train.branching.branch_config) for a branch's start."""
    cfg.check_values()
    world = int(world_size or rank_and_world()[1])
    run = RunFolder(cfg.out)
    check_run_folder(run)
    ds_path = resolve_ds_path(str(cfg.ds_config))
    ds_json = load_ds_json(ds_path)
    stage = check_ds_json(ds_json, ds_path, cfg.precision, cfg.ema, cfg.evaluates)
    micro = micro_batch(cfg.global_batch, cfg.grad_accum, world)
    meta, manifest = open_shard_sets(str(cfg.shards))
    digest = data_digest(manifest)
    saved = run.read_config() if run.config.exists() else None
    order = data_order_of(saved, branch)
    # the resolved number is what a run records (its identity): the flags as the plan resolved them
    flags = {**cfg.to_dict(), "mix_shards": int(cfg.mix_shards) if int(cfg.mix_shards) >= 0 else MIX_SHARDS[order]}
    identity = identity_of(flags, {"data_digest": digest, "zero_stage": stage})
    amended: dict = {}
    if saved is not None:  # the run's identity first: a changed --model must not be reported as a misfit
        allowed = tuple(k.strip().replace("-", "_") for k in str(cfg.allow_change).split(",") if k.strip())
        amended = check_same_run(saved.get("identity") or _legacy_identity(saved), identity, str(run.path), allowed)
    model_cfg = model_config_for(cfg, meta, saved)
    check_meta_matches(model_cfg, meta, cfg.shards)
    stages = (paper_schedule(int(cfg.patch_levels), float(cfg.epoch_rate), int(cfg.epochs)) if cfg.patch_levels
              else parse_schedule(str(cfg.schedule), tuple(model_cfg.grid)))
    spec = None
    if cfg.evaluates:
        spec = cfg.eval_spec()
        try:
            spec.validate(prefix="eval-")
        except UsageError as e:
            raise UsageError(f"--eval-every: {e}") from None
    steps_per_epoch = meta["samples"] // cfg.global_batch
    if steps_per_epoch < 1 and cfg.total_steps is None:
        raise TrainingError(f"{meta['samples']} samples are fewer than one global batch of {cfg.global_batch}: "
                            "lower --global-batch")
    total = int(cfg.total_steps or cfg.epochs * steps_per_epoch)
    workers = auto_workers(int(cfg.workers), len(manifest), world)
    if order == 1 and len(manifest) < world * workers:
        raise TrainingError(
            f"{len(manifest)} shards cannot feed {world} ranks x {workers} loader workers (a rank or worker without "
            f"shards hangs the job): lower --workers to {max(1, len(manifest) // world)} or re-tokenize with a smaller "
            f"--samples-per-shard so there are at least {world * workers} shards")
    resume = resume_tag(run, world)
    branch = (saved or {}).get("branch") or branch
    prepare_branch = False
    if branch and resume is None:  # a new branch (or one whose preparation was cut short)
        from npp.train.branching import check_branch_checkpoint

        parent = RunFolder(branch["parent"])
        check_branch_checkpoint(parent, branch)
        resume, prepare_branch = resume_tag_of(parent, branch["tag"], world), True
    if cfg.branch_epoch_list() and cfg.total_steps is not None:
        raise UsageError("--branch-epochs needs an epoch budget: drop --total-steps (a branch is a run of fewer "
                         "epochs)")
    optimizer = OptimizerSettings.of(cfg, steps_per_epoch)
    branch_steps = branch_points(stages, int(cfg.epochs), steps_per_epoch, optimizer.warmup_steps,
                                 optimizer.decay_ratio, cfg.branch_epoch_list())
    check_branch_points_ahead(run, branch_steps, resume)
    replaced = replaced_keys(ds_json)
    notes = [f"{ds_path}: {', '.join(replaced)} replaced by npp's flags (--global-batch, --grad-accum, --grad-clip, "
             "--precision)"] if replaced else []
    eval_every = cfg.eval_interval(steps_per_epoch)
    return TrainPlan(
        flags=flags, identity=identity, out=str(cfg.out), model=str(cfg.model), seed=int(cfg.seed), world_size=world,
        ds_path=ds_path, ds_json=ds_json, zero_stage=stage, meta=meta, data_digest=digest, model_cfg=model_cfg,
        stages=tuple(stages), steps_per_epoch=steps_per_epoch, total_steps=total,
        cadence=Cadence(total, int(cfg.sync_every), int(cfg.log_every), int(cfg.ckpt_every), eval_every,
                        frozenset(branch_steps.values())),
        optimizer=optimizer, engine=EngineSettings.of(cfg),
        feed=FeedSettings(str(cfg.shards), tuple(manifest), int(cfg.shuffle_buffer), flags["mix_shards"], micro,
                          workers, order),
        loop=LoopSettings(int(cfg.global_batch), int(cfg.grad_accum), float(cfg.grad_clip), str(cfg.grad_comm),
                          int(cfg.max_bad_steps), float(cfg.collective_timeout), int(cfg.keep)),
        tracking=TrackingSettings(bool(cfg.tracking), str(cfg.experiment), str(cfg.run_name)),
        eval_spec=spec, resume_tag=resume, mlflow_names=mlflow_names_of(saved, branch),
        heldout=tuple(heldout_shards(str(cfg.shards))), branch_steps=branch_steps, branch=branch,
        prepare_branch=prepare_branch, changes=mutable_changes(saved.get("train", {}), flags) if saved else {},
        amended=amended, first_identity=(saved.get("first_identity") or saved.get("identity") or {}) if saved else {},
        starts=tuple(saved.get("starts", [])) if saved else (), notes=tuple(notes))


MIX_SHARDS = {1: 16, 2: 256}  # --mix-shards -1 per data order (bench/class_mixing.py: docs/reference.md)


def kept_version(key: str, current: int, saved: dict | None, branch: dict | None) -> int:
    """A versioned behaviour a run keeps for its life (config.json `key`): its run's (a run begun before the
    key was recorded has version 1), a new branch's parent's, else the current one."""
    if saved is not None:
        return int(saved.get(key, 1))
    if branch is not None:
        parent = RunFolder(branch["parent"])
        return int(parent.read_config().get(key, 1)) if parent.config.exists() else current
    return current


def data_order_of(saved: dict | None, branch: dict | None) -> int:
    """The data order a start keeps (a branch must see its parent's batches)."""
    return kept_version("data_order", ORDER, saved, branch)


def mlflow_names_of(saved: dict | None, branch: dict | None) -> int:
    """The MLflow names a start logs under (npp.runtime.metric_names); a branch's MLflow run holds its parent's
    points up to the branch step, under the parent's names."""
    return kept_version("mlflow_names", NAMING, saved, branch)


def resume_tag_of(run: RunFolder, tag: str, world_size: int) -> str:
    """`tag` of `run`, refused like `resume_tag` when it was saved by another number of ranks."""
    saved = run.saved_world_size(tag)
    if saved != world_size and not run.is_universal(tag):
        raise TrainingError(f"{run.tag_dir(tag)} was saved by {saved} ranks, this job has {world_size}: start the "
                            f"branch on {saved} ranks, as its parent ran (its data order depends on them)")
    return tag


def check_branch_points_ahead(run: RunFolder, steps: dict, resume: str | None) -> None:
    """A branch point already passed must have its checkpoint (--branch-epochs added on a resume too late)."""
    if not resume:
        return
    now = tag_step(resume)
    for epochs, step in steps.items():
        if step < now and not run.tag_dir(tag_for(step)).is_dir():
            raise UsageError(f"--branch-epochs {epochs}: its branch point (step {step}) is behind this run (at step "
                             f"{now}) and no checkpoint was kept there: drop {epochs} from --branch-epochs, or train "
                             f"the {epochs}-epoch run from scratch")


def _legacy_identity(saved: dict) -> dict:
    """The identity of a run folder written before identities were recorded: its saved flags."""
    train = saved.get("train", {})
    return identity_of(train, {}) if train else {}


def run_files(plan: TrainPlan, ds_config: dict, git_commit: str, precision: str) -> dict:
    """config.json's content for this start: the run's identity, the flags, the resolved plan, and the list of
    starts with the mutable flags each changed (the first start's entry has none)."""
    this = {"resume_tag": plan.resume_tag, "world_size": plan.world_size, "workers": plan.feed.workers,
            "micro_batch": plan.micro_batch, "git_commit": git_commit,
            "changed": {k: {"was": a, "now": b} for k, (a, b) in plan.changes.items()},
            "amended": {k: {"was": a, "now": b} for k, (a, b) in plan.amended.items()}}
    starts = [*plan.starts, this]
    return {
        "identity": dict(plan.identity),  # copies: what a caller does with the record never reaches the plan
        "first_identity": dict(plan.first_identity or plan.identity),  # what MLflow's params hold
        "train": dict(plan.flags),
        "model_config": plan.model_cfg.to_dict(),
        "parameters": count_parameters(plan.model_cfg),
        "schedule": format_schedule(list(plan.stages)),
        "schedule_steps": [[s.patch_side, s.start, s.end] for s in plan.schedule.spans],
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "world_size": plan.world_size,
        "data_order": plan.feed.order,
        "mlflow_names": plan.mlflow_names,
        "precision": precision,
        "ds_config_path": str(Path(plan.ds_path)),
        "shards_meta": {k: plan.meta[k] for k in ("grid", "codebook_size", "num_classes", "samples", "tokenizer",
                                                  "sets") if k in plan.meta},
        "data_digest": plan.data_digest,
        **({"heldout": {"samples": plan.meta.get("val_samples", 0), "shards": len(plan.heldout),
                        "digest": data_digest(list(plan.heldout))}} if plan.heldout else {}),
        "git_commit": git_commit,
        "starts": starts,
        **({"branch_points": {str(e): s for e, s in plan.branch_steps.items()}} if plan.branch_steps else {}),
        **({"branch": plan.branch} if plan.branch else {}),
    }
