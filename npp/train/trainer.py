"""Stage 2: DeepSpeed ZeRO training with the Next Patch Prediction schedule.

`Trainer.train()` loads or starts a run, then loops `train_step` to the end of the
budget; checkpoints, schedules, data, tracking are components (see the sibling
modules). Every rank runs the same code under torchrun, the deepspeed launcher,
srun, or alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from npp.models.configs import GPTConfig, gpt_config
from npp.models.gpt import GPT
from npp.pipeline.runs import RunFolder
from npp.pipeline.shards import open_shard_sets
from npp.pipeline.stream import CodeStream, batch_to_device, make_loader, next_untouched_epoch, shard_paths
from npp.train import checkpointing
from npp.train.bad_steps import BadSteps
from npp.train.config import TrainConfig
from npp.train.distributed import DistEnv, barrier, init, read_env, stale_extension_locks
from npp.train.ds_config import build_ds_config, resolve_precision
from npp.train.errors import TrainingError
from npp.train.mfu import peak_flops
from npp.train.progress import Progress
from npp.train.schedule import PatchSchedule, format_schedule, paper_schedule, parse_schedule
from npp.train.step import TrainStep, build_model_and_optimizer, offloads_optimizer, start_engine
from npp.train.state import TrainState
from npp.train.stopping import StopRequest
from npp.train.tracking import Tracker, git_commit


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


def default_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    return max(1, min(8, cpus - 1)) if cpus else 4


class Trainer:
    def __init__(self, cfg: TrainConfig, evaluator=None):
        """`evaluator`: a callable (model, num_classes, device, rank, world) -> metrics (rank 0), called at the
        eval points; the app builds it from the eval stage (npp.eval.during_training)."""
        self.cfg = cfg
        self.evaluator = evaluator
        self.run = RunFolder(cfg.out)
        self.env: DistEnv = read_env()
        cuda = torch.cuda.is_available()
        # Everything that can be wrong with the inputs is checked before the process group starts: the flags
        # (cfg.validate, which the CLI runs before importing torch), then what needs the shard set's manifest.
        cfg.validate()
        self.meta, self.manifest = open_shard_sets(cfg.shards)
        self.precision = resolve_precision(cfg.precision, cuda)  # resolved once, handed to every part below
        self.ds_config = build_ds_config(cfg, self.env.world_size, cuda, self.precision)
        self.model_cfg = self._model_config()
        check_meta_matches(self.model_cfg, self.meta, cfg.shards)
        self.steps_per_epoch = self.meta["samples"] // cfg.global_batch
        if self.steps_per_epoch < 1 and cfg.total_steps is None:
            raise TrainingError(
                f"{self.meta['samples']} samples are fewer than one global batch of {cfg.global_batch}: lower --global-batch"
            )
        stages = (
            paper_schedule(cfg.patch_levels, cfg.epoch_rate, cfg.epochs)
            if cfg.patch_levels
            else parse_schedule(str(cfg.schedule), self.model_cfg.grid)
        )
        self.total_steps = int(cfg.total_steps or cfg.epochs * self.steps_per_epoch)
        self.schedule = PatchSchedule(stages, self.total_steps)
        self.stage_flops = self.schedule.flops_per_sample(self.model_cfg)  # per sample, per stage
        self.warmup_steps = int(round(cfg.warmup_epochs * max(1, self.steps_per_epoch)))
        self.eval_every = cfg.eval_interval(self.steps_per_epoch)  # 0: no evaluation during training
        if self.eval_every and self.evaluator is None:
            raise TrainingError("--eval-every needs an evaluator: run training through `npp train` (it builds one "
                                "from --vq, --eval-ref and --inception/--classifier)")
        self.workers = default_workers(cfg.workers)
        if offloads_optimizer(self.ds_config):  # DeepSpeed JIT-builds its cpu_adam op
            stale = stale_extension_locks(["cpu_adam"])
            if stale:
                raise TrainingError(
                    f"{stale[0]} is left by an interrupted build of DeepSpeed's cpu_adam op: every start would wait "
                    "on it forever. If no build is running on any node, delete it and rerun"
                )
        # a ZeRO checkpoint of another world size is refused here, before any work
        self.resume_tag = checkpointing.check_world_size(self.run, self.env.world_size)
        if self.resume_tag and self.run.is_universal(self.resume_tag):
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        need = self.env.world_size * max(1, self.workers)
        if len(self.manifest) < need:
            raise TrainingError(
                f"{len(self.manifest)} shards cannot feed {self.env.world_size} ranks x {max(1, self.workers)} loader "
                f"workers (a rank or worker without shards hangs the job): lower --workers to "
                f"{max(1, len(self.manifest) // self.env.world_size)} or re-tokenize with a smaller --samples-per-shard "
                f"so there are at least {need} shards"
            )
        self.last_lr = 0.0

    @property
    def step(self) -> int:
        """Optimizer steps applied (the resumable state's)."""
        return self.state.step

    # --- set-up ------------------------------------------------------------------
    def _model_config(self) -> GPTConfig:
        if self.run.config.exists():  # a resumed run keeps the model it was started with
            return GPTConfig.from_dict(self.run.read_config()["model_config"])
        h, w = self.meta["grid"]
        return gpt_config(
            self.cfg.model,
            vocab_size=self.meta["codebook_size"],
            block_size=h * w,
            grid=(h, w),
            num_classes=self.meta["num_classes"],
            token_dropout_p=self.cfg.token_dropout,
            resid_dropout_p=self.cfg.resid_dropout,
            ffn_dropout_p=self.cfg.ffn_dropout,
            attn_dropout_p=self.cfg.attn_dropout,
            drop_path_rate=self.cfg.drop_path,
            class_dropout_prob=self.cfg.class_dropout,
        )

    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        return self.schedule.lr_at(step, c.lr, c.end_lr, self.warmup_steps, c.decay_ratio) / c.lr

    def _build(self) -> None:
        self.device = init(self.env)
        torch.manual_seed(self.cfg.seed)  # same initial weights on every rank
        model, optimizer = build_model_and_optimizer(self.model_cfg, self.cfg, self.device, self.precision,
                                                     offload=offloads_optimizer(self.ds_config))
        torch.manual_seed(self.cfg.seed * 1000 + self.env.rank)  # different dropout per rank
        np.random.seed(self.cfg.seed * 1000 + self.env.rank)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine, self.ema, self.compiled = start_engine(model, optimizer, self.ds_config, self.cfg, self.precision,
                                                            self.device, keep_ema=self.env.is_main, scheduler=scheduler)
        self.step_fn = TrainStep(self.engine, self.ema)

    def _write_run_files(self) -> list[str]:
        self.run.path.mkdir(parents=True, exist_ok=True)
        config = {
            "train": self.cfg.to_dict(),
            "model_config": self.model_cfg.to_dict(),
            "schedule": format_schedule(self.schedule.stages),
            "schedule_steps": [[s.patch_side, s.start, s.end] for s in self.schedule.spans],
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.env.world_size,
            "shards_meta": {k: self.meta[k] for k in ("grid", "codebook_size", "num_classes", "samples", "tokenizer", "sets")},
            "git_commit": git_commit(),
        }
        paths = [self.run.config, self.run.ds_config]
        paths[0].write_text(json.dumps(config, indent=2, default=str))
        paths[1].write_text(json.dumps(self.ds_config, indent=2))
        self.run_config = config
        return [str(p) for p in paths]

    # --- the loop ----------------------------------------------------------------
    def train(self) -> dict:
        self._build()
        batches = self._start()
        stage = None
        try:
            while self.state.step < self.total_steps:
                span = self.schedule.stage_at(self.state.step)
                if span.index != stage:
                    stage = span.index
                    self._log(f"stage {span.index}: patch side k={span.patch_side} for steps [{span.start}, {span.end})")
                loss = self.train_step(batches, span.patch_side)
                flops = self.cfg.global_batch * self.stage_flops[span.index]
                self.state.train_flops += flops  # spent, applied or not
                if loss is None:  # DeepSpeed skipped the update: a gradient was not finite
                    self.bad.skipped(self.state.step + 1, self._last_good, self._log)
                else:
                    self.bad.applied()
                    self.state.step += 1
                    self._record(loss, span.patch_side, flops)
                    if self._eval_due():
                        with self.progress.exclude("eval"):
                            self._evaluate()
                if self._sync_due(skipped=loss is None) and self._sync():
                    return self._stop_and_save()
                step = self.state.step
                if loss is not None and step % self.cfg.ckpt_every == 0 and step < self.total_steps:
                    with self.progress.exclude("ckpt"):
                        self._save()
            self._save()
        except BaseException:
            self.tracker.finish("FAILED", wait_s=30.0)
            raise
        return self._finish()

    def train_step(self, batches, patch_side: int) -> Optional[torch.Tensor]:
        """One optimizer step of grad_accum micro-batches (npp.train.step.TrainStep): this rank's mean loss,
        still on the device, or None when DeepSpeed skipped the update because a gradient was not finite.

        Nothing here waits for the device: no loss is read and no flag is agreed on per
        micro-step (the sync points do that), so the host queues the next micro-step while
        the GPU runs this one.
        """
        self.last_lr = self.engine.get_lr()[0]  # the rate this step is taken with
        return self.step_fn(self._micro_batches(batches), patch_side)

    def _micro_batches(self, batches):
        """The next grad_accum batches on the device, counted (resume position) as they are taken."""
        for _ in range(self.cfg.grad_accum):
            batch = next(batches)
            self.state.micro_batches += 1
            for shard in batch.get("skipped", ()):  # one line per shard the data stream skipped, each counted once
                print(f"[npp train] rank {self.env.rank}: warning: skipped corrupt shard {shard}", flush=True)
            self.progress.corrupt_local += batch["corrupt"]
            yield batch_to_device(batch, self.device)

    # --- components used by the loop -----------------------------------------------
    def _loader(self):
        paths, counts = shard_paths(self.cfg.shards, self.manifest)
        stream = CodeStream(
            paths, counts, batch_size=self.ds_config["train_micro_batch_size_per_gpu"], rank=self.env.rank,
            world=self.env.world_size, seed=self.cfg.seed, shuffle_buffer=self.cfg.shuffle_buffer,
            start_batches=self.state.micro_batches - self.state.data_base["micro_batches"],
            start_epoch=self.state.data_base["epoch"],
            num_workers=self.workers, mix_shards=self.cfg.mix_shards,
        )
        return make_loader(stream, self.workers)

    def _start(self):
        """Write the run files, resume or start, attach MLflow; returns the batch iterator.

        Order matters for exact resume: the DataLoader iterator is created (it draws a
        seed from torch's global generator) before this rank's saved RNG state is put
        back, as it was in the uninterrupted run at the step of the checkpoint.
        """
        artifacts = self._write_run_files() if self.env.is_main else []
        barrier()
        client, rng = checkpointing.load(self.engine, self.run, self.env, self.ema)
        self.state = TrainState.from_client_state(client, rng)
        resumed = client is not None
        self.state.data_base = self._data_position(resumed)
        self.bad = BadSteps(self.state.bad_steps, self.cfg.max_bad_steps)
        self.progress = Progress(self.run.metrics, self.env.is_main, self.device, self.cfg.log_every, self.total_steps,
                                 corrupt_base=self.state.corrupt_shards)
        self.progress.resume_at(self.state.step)
        self.tracker = Tracker(self.env.is_main and self.cfg.tracking, self.run, self._log)
        run_id = self.state.mlflow_run_id or self.run.mlflow_run_id()
        self.tracker.start(
            self.cfg.experiment, self.cfg.run_name or self.run.path.name, run_id,
            params=self.run_config if self.env.is_main else {},
            tags={"git_commit": self.run_config.get("git_commit", "") if self.env.is_main else "",
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                  "zero_stage": str(self.ds_config["zero_optimization"].get("stage", 0)),
                  "schedule": format_schedule(self.schedule.stages)},
            artifacts=artifacts, dataset=self._dataset_identity() if self.env.is_main else None,
            resume_step=self.state.step,
        )
        self.stop = StopRequest(self.run.stop_file, self.env.is_main)
        self.stop.install()
        self._log(f"{'resuming at' if self.state.step else 'starting'} step {self.state.step}/{self.total_steps}; "
                  f"{self.schedule.describe()}; world {self.env.world_size}, micro-batch "
                  f"{self.ds_config['train_micro_batch_size_per_gpu']}, {self.workers} loader workers; precision "
                  f"{self.precision}, blocks {'compiled' if self.compiled else 'eager'}")
        batches = iter(self._loader())
        if self.state.rng is not None:
            checkpointing.set_rng_state(self.state.rng)
        elif self.state.step:  # resumed on new ranks (universal checkpoint): fresh, deterministic per-rank streams
            seed = (self.cfg.seed * 1000 + self.env.rank + 1_000_003 * self.state.step) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
        return batches

    def _layout(self) -> dict:
        return {"world_size": self.env.world_size, "workers": max(1, self.workers),
                "micro_batch": self.ds_config["train_micro_batch_size_per_gpu"]}

    def _data_position(self, resumed: bool) -> dict:
        """Where this start's data streams begin: {"epoch", "micro_batches"} (micro-batches are counted from there).

        Same layout as the checkpoint: the streams replay exactly. Another layout (world
        size, loader workers, micro-batch): continue at the first data epoch no old
        stream had begun (npp.pipeline.stream.next_untouched_epoch).
        """
        base = dict(self.state.data_base)
        if not resumed:
            return base
        old = {**self._layout(), **(self.state.data_layout or {})}
        if old == self._layout():
            return base
        paths, counts = shard_paths(self.cfg.shards, self.manifest)
        epoch = next_untouched_epoch(paths, counts, old["micro_batch"], old["world_size"], old["workers"],
                                     self.cfg.seed, base["epoch"], self.state.micro_batches - base["micro_batches"])
        seen = (self.state.micro_batches - base["micro_batches"]) * old["micro_batch"] * old["world_size"]
        self._log(f"data layout changed ({old} -> {self._layout()}): streams continue at data epoch {epoch} "
                  f"({seen} samples consumed since epoch {base['epoch']}; none is repeated)")
        return {"epoch": epoch, "micro_batches": self.state.micro_batches}

    def _dataset_identity(self) -> dict:
        """The shard set(s) as MLflow sees a dataset: name, a digest of every shard's sha256, where it lives."""
        import hashlib

        digest = hashlib.sha256("".join(m["sha256"] for m in self.manifest).encode()).hexdigest()[:16]
        sets = self.meta.get("sets") or [self.cfg.shards]
        return {"name": ",".join(Path(s).name for s in sets), "digest": digest, "source": os.path.abspath(sets[0])}

    def _stop_and_save(self) -> dict:
        reason = self.stop.reason()
        self._save()
        self.stop.consume()
        self._log(f"stop requested ({reason}): saved step {self.state.step} in {self.run.checkpoints}, exiting 0 for "
                  "requeue")
        self.tracker.finish("KILLED", wait_s=min(30.0, float(os.environ.get("NPP_MLFLOW_DRAIN_S", 30))))
        return {"step": self.state.step, "stopped": True}

    def _finish(self) -> dict:
        barrier()
        exported = None
        if self.env.is_main:
            from npp.train.export import export

            exported = export(str(self.run.path))
            self.tracker.log({"exported_step": self.state.step}, self.state.step)
        self.tracker.finish()
        return {"step": self.state.step, "stopped": False, "exported": exported}

    def _evaluate(self) -> None:
        """FID & co of the model now (the EMA when there is one), logged at this step beside train_flops.

        Every rank samples its pieces; the training RNG streams are saved and put back, so
        an evaluation never changes what training does (exact resume holds with evals on).
        """
        rng = checkpointing.rng_state()
        model = self._sampling_model()
        metrics = self.evaluator(model, self.model_cfg.num_classes, self.device, self.env.rank, self.env.world_size)
        checkpointing.set_rng_state(rng)
        if self.env.is_main:
            metrics["train_flops"] = self.state.train_flops
            self.tracker.log(metrics, self.state.step)
            self._log(f"eval at step {self.state.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _sampling_model(self):
        if self.ema is None:
            return self.engine.module
        if self.env.world_size == 1:
            return self.ema.model
        # the EMA lives on rank 0: every rank samples with a copy of it
        if self.ema.model is not None:
            model = self.ema.model
        else:
            if getattr(self, "_ema_copy", None) is None:
                self._ema_copy = GPT(self.model_cfg).to(self.device).eval()
            model = self._ema_copy
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)
        return model

    def _last_good(self) -> str:
        return f"{self.run.latest_tag()} in {self.run.checkpoints}"

    def _eval_due(self) -> bool:
        return bool(self.eval_every) and (self.state.step % self.eval_every == 0 or self.state.step == self.total_steps)

    def _sync_due(self, skipped: bool) -> bool:
        """Sync points: every --sync-every steps, log/checkpoint/eval steps, the last step, a skipped step.
        A function of the step alone (and of DeepSpeed's skip, the same on every rank): all ranks agree."""
        s = self.state.step
        return (skipped or s % self.cfg.sync_every == 0 or s % self.cfg.log_every == 0 or s % self.cfg.ckpt_every == 0
                or self._eval_due() or s == self.total_steps)

    def _sync(self) -> bool:
        """At a sync point: read the pending losses into metrics.jsonl, then agree on a stop request (one
        all-reduce); True when the ranks stop here."""
        self.progress.flush()
        return self.stop.agreed(self.device)

    def _record(self, loss: torch.Tensor, patch_side: int, flops: float) -> None:
        if not self.progress.record(self.state.step, loss, patch_side, self.last_lr, flops):
            return
        h, w = self.model_cfg.grid
        metrics = self.progress.window_metrics(self.env.world_size, self.cfg.global_batch, h * w,
                                               peak_flops(self.device), self.engine.get_global_grad_norm())
        metrics.update(lr=self.last_lr, patch_side=patch_side, train_flops=self.state.train_flops,
                       epoch=self.state.step / max(1, self.steps_per_epoch), bad_steps=self.bad.total)
        with self.progress.exclude("log"):
            self.tracker.log(metrics, self.state.step)
            Progress.line(self.state.step, metrics, self._log)

    def _save(self) -> None:
        self.progress.flush()  # every record up to the checkpoint's step is on disk before it
        self.progress.global_counters()  # a collective: every rank saves at the same step
        self.state.bad_steps, self.state.corrupt_shards = self.bad.total, self.progress.corrupt_total
        self.state.mlflow_run_id, self.state.world_size = self.tracker.run_id, self.env.world_size
        self.state.data_layout = self._layout()
        checkpointing.save(self.engine, self.run, self.state.step, self.state.client_state(), self.env, self.ema,
                           self.cfg.keep)

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[npp train] {msg}", flush=True)


def train(cfg: TrainConfig, evaluator=None) -> None:
    """Train a GPT on a shard set with DeepSpeed and the NPP schedule; resumes from the run directory."""
    result = Trainer(cfg, evaluator).train()
    if result.get("stopped"):
        sys.exit(0)
