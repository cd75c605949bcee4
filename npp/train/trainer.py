"""Stage 2: DeepSpeed ZeRO training with the Next Patch Prediction schedule.

`Trainer(plan).train()` starts or resumes the run the plan describes (npp.train.plan: every input checked,
everything resolved, before torch is imported), then loops `train_step` to the end of the budget. Decisions belong
to components: when to sync, evaluate and save (cadence), the data streams (data_feed), evaluation with its RNG and
EMA handling (eval_points), the run's files and MLflow record (run_record), checkpoints (checkpointing), non-finite
steps (bad_steps), stop requests (stopping), records (progress), MLflow (tracking). Every rank runs the same code
under torchrun, the deepspeed launcher, srun, or alone.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from npp.pipeline.runs import RunFolder, tag_for
from npp.pipeline.stream import batch_to_device
from npp.runtime import settings
from npp.runtime.environment import mlflow_drain_s
from npp.runtime.metric_names import DIAG, for_mlflow
from npp.train import checkpointing
from npp.train import run_record as record
from npp.train.bad_steps import BadSteps
from npp.train.branching import own_mlflow_run_id, start_branch
from npp.train.data_feed import DataFeed
from npp.train.distributed import DistEnv, barrier, init, read_env
from npp.train.errors import TrainingError
from npp.train.eval_points import EvalPoints
from npp.train.export import export
from npp.train.heldout import HeldOutLoss
from npp.train.mfu import peak_flops
from npp.train.plan import TrainPlan
from npp.train.progress import Progress
from npp.train.run_record import dataset_identity, describe_changes, mlflow_params, mlflow_tags, write_run_files
from npp.train.state import TrainState
from npp.train.step import TrainStep, build_model_and_optimizer, check_no_stale_build, offloads_optimizer, start_engine
from npp.train.stopping import StopRequest
from npp.train.tracking import Tracker
from npp.train.watchdog import ProgressWatchdog


class Trainer:
    def __init__(self, plan: TrainPlan, evaluator=None):
        """`plan`: npp.train.plan.make_plan's; `evaluator`: a callable (model, num_classes, device, rank, world) ->
        metrics at the eval points (the app's, npp.eval.during_training)."""
        self.plan, self.model_cfg, self.loop = plan, plan.model_cfg, plan.loop
        self.env: DistEnv = read_env()
        if self.env.world_size != self.plan.world_size:
            raise TrainingError(f"planned for {self.plan.world_size} ranks, started on {self.env.world_size}")
        self.run, self._evaluator, cuda = RunFolder(self.plan.out), evaluator, torch.cuda.is_available()
        self.precision = settings.precision(self.plan.engine.precision, cuda, training=True)
        self.ds_config = self.plan.device_ds_config(self.precision, cuda)
        self.total_steps, self.schedule = self.plan.total_steps, self.plan.schedule
        self.stage_flops = self.schedule.flops_per_sample(self.model_cfg)  # per sample, per stage
        if self.cadence.eval_every and evaluator is None:
            raise TrainingError("--eval-every needs an evaluator: train through `npp train` (it builds one from --vq)")
        check_no_stale_build(self.ds_config)
        if self.plan.resume_tag and self.run.is_universal(self.plan.resume_tag):
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.feed = DataFeed.of(self.plan, self.env.rank, self.env.world_size)
        self.last_lr = 0.0  # the rate of the step in flight

    step = property(lambda self: self.state.step, doc="Optimizer steps applied (the resumable state's).")
    cadence = property(lambda self: self.plan.cadence, doc="When the loop syncs, logs, saves and evaluates.")

    def _lr_factor(self, step: int) -> float:
        o = self.plan.optimizer
        return self.schedule.lr_at(step, o.lr, o.end_lr, o.warmup_steps, o.decay_ratio) / o.lr

    def _build(self) -> None:
        self.device, seed = init(self.env, self.loop.collective_timeout), self.plan.seed
        torch.manual_seed(seed)  # same initial weights on every rank
        model, optimizer = build_model_and_optimizer(self.model_cfg, self.plan.engine, self.plan.optimizer,
                                                     self.device, self.precision,
                                                     offload=offloads_optimizer(self.ds_config))
        torch.manual_seed(seed * 1000 + self.env.rank)  # different dropout per rank
        np.random.seed(seed * 1000 + self.env.rank)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine, self.ema, self.compiled = start_engine(model, optimizer, self.ds_config, self.plan.engine,
                                                            self.precision, self.device, keep_ema=self.env.is_main,
                                                            scheduler=scheduler)
        self.step_fn = TrainStep(self.engine, self.ema)
        self.evals = EvalPoints(self._evaluator, self.model_cfg, self.device, self.env.rank, self.env.world_size,
                                HeldOutLoss.of(self.plan.heldout, self.env, self.plan.micro_batch, self.device))

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
                    self._log(f"stage {stage}: patch side k={span.patch_side} for steps [{span.start}, {span.end})")
                loss = self.train_step(batches, span.patch_side)
                flops = self.loop.global_batch * self.stage_flops[span.index]
                self.state.train_flops += flops  # spent, applied or not
                if loss is None:  # DeepSpeed skipped the update: a gradient was not finite
                    self.bad.skipped(self.state.step + 1, lambda: f"{self.run.latest_tag()} in {self.run.checkpoints}",
                                     self._log)
                else:
                    self.bad.applied()
                    self.state.step += 1
                    self._record(loss, span.patch_side, flops)
                    if self.evals.due(self.cadence, self.state.step):
                        with self.progress.exclude("eval"):
                            self._evaluate()
                if self.cadence.sync_due(self.state.step, skipped=loss is None) and self._sync():
                    return self._stop_and_save()
                if loss is not None and self.cadence.ckpt_due(self.state.step):
                    with self.progress.exclude("ckpt"):
                        self._save()
            self._save()
        except BaseException:
            self.tracker.finish("FAILED", wait_s=30.0)
            raise
        finally:
            self.progress.unwatch()  # the end's export and barriers are not steps
        return self._finish()

    def train_step(self, batches, patch_side: int) -> torch.Tensor | None:
        """One optimizer step (npp.train.step.TrainStep): this rank's mean loss, still on the device (read at sync
        points only), or None when DeepSpeed skipped the update because a gradient was not finite."""
        self.last_lr = self.engine.get_lr()[0]  # the rate this step is taken with
        return self.step_fn(self._micro_batches(batches), patch_side)

    def _micro_batches(self, batches):
        """The next grad_accum batches on the device, counted (resume position) as they are taken."""
        for _ in range(self.loop.grad_accum):
            batch = next(batches)
            self.state.micro_batches += 1
            self.progress.skipped_shards(batch, self.env.rank)
            yield batch_to_device(batch, self.device)

    # --- start, stop, finish ---------------------------------------------------------
    def _start(self):
        """Write the run files, resume or start, attach MLflow; returns the batch iterator.

        Order matters for exact resume: the DataLoader iterator is created (it draws a
        seed from torch's global generator) before this rank's saved RNG state is put
        back, as it was in the uninterrupted run at the step of the checkpoint.
        """
        config, artifacts = (write_run_files(self.run, self.plan, self.ds_config, self.precision) if self.env.is_main
                             else ({}, []))
        if self.plan.prepare_branch:  # a branch's first start: the parent's checkpoint, put here by rank 0
            start_branch(self.run, self.plan.branch, self.env.is_main, self.device, self._log)
        barrier()
        client, rng = checkpointing.load(self.engine, self.run, self.env, self.ema, self.plan.resume_tag)
        self.state = TrainState.from_client_state(client, rng)
        self.state.mlflow_run_id = own_mlflow_run_id(self.plan.branch, self.state)
        self.state.data_base = self.feed.position(self.state, client is not None, self._log)
        self.bad = BadSteps(self.state.bad_steps, self.loop.max_bad_steps)
        self.progress = Progress(self.run.metrics, self.env.is_main, self.device, self.cadence.log_every,
                                 self.total_steps, corrupt_base=self.state.corrupt_shards,
                                 hours_base=self.state.train_hours, flops_left=lambda s: self.loop.global_batch
                                 * self.schedule.flops_left(s, self.stage_flops))
        self.progress.resume_at(self.state.step)
        tracking = self.plan.tracking
        self.tracker = Tracker(self.env.is_main and tracking.enabled, self.run, self._log)
        self.tracker.start(
            tracking.experiment, record.run_name(tracking.run_name, config, self.run.path.name),
            self.state.mlflow_run_id or self.run.mlflow_run_id(),
            params=mlflow_params(config) if config else {}, tags=mlflow_tags(config, self.plan) if config else {},
            artifacts=artifacts, dataset=dataset_identity(self.plan) if config else None, resume_step=self.state.step)
        self.stop = StopRequest(self.run.stop_file, self.env.is_main)
        self.stop.install()
        barrier()  # every rank past start-up (rank 0 alone made the MLflow run): the watchdog watches training only
        self.progress.watch(ProgressWatchdog.of_job(self.loop.collective_timeout, self.env.rank, self.env.world_size))
        for line in [f"note: {n}" for n in self.plan.notes] + [describe_changes(self.plan)] * bool(self.plan.changes):
            self._log(line)
        self._log(f"{'resuming at' if self.state.step else 'starting'} step {self.state.step}/{self.total_steps}; "
                  f"{self.schedule.describe()}; world {self.env.world_size}, micro-batch {self.plan.micro_batch}, "
                  f"{self.plan.feed.workers} loader workers; precision {self.precision}, blocks "
                  f"{'compiled' if self.compiled else 'eager'}")
        batches = iter(self.feed.loader(self.state))
        checkpointing.restore_rng(self.state.rng, self.plan.seed, self.env.rank, self.state.step)
        return self.progress.begin(batches)

    def _stop_and_save(self) -> dict:
        reason = self.stop.reason()
        self._save()
        self.stop.consume()
        self._log(f"stop requested ({reason}): saved step {self.state.step} in {self.run.checkpoints}, exiting 0 for "
                  "requeue")
        self.tracker.finish("KILLED", wait_s=min(30.0, mlflow_drain_s()))  # gone before SLURM's KillWait (30 s)
        barrier()  # leave together, as at the end
        return {"step": self.state.step, "stopped": True}

    def _finish(self) -> dict:
        barrier()
        exported = export(str(self.run.path)) if self.env.is_main else None
        if self.env.is_main:  # the model, where MLflow shows it: the run's tags, and its logged model (by reference)
            self.tracker.log({f"{DIAG}exported_step": self.state.step}, self.state.step)
            self.tracker.tag({"exported_model": os.path.abspath(exported), "exported_step": self.state.step})
        self.tracker.finish(model=(exported, self.state.step))
        barrier()  # every rank leaves together: no node's launcher outlives the others' (a quiet end)
        return {"step": self.state.step, "stopped": False, "exported": exported}

    # --- what the loop calls -------------------------------------------------------
    def _evaluate(self) -> None:
        """FID & co of the model now (the EMA when there is one) and the held-out loss, logged at this step beside
        train_flops (and the held-out loss in metrics.jsonl)."""
        metrics = self.evals(self.engine.module, self.ema, sample=self.cadence.eval_due(self.state.step))
        if self.env.is_main:
            self.progress.note(self.state.step, {k: v for k, v in metrics.items() if k == HeldOutLoss.METRIC})
            self.tracker.tag(self.evals.protocol_tags(metrics))
            metrics.update(train_flops=self.state.train_flops, train_pflops=self.state.train_flops / 1e15)
            self.tracker.log(for_mlflow(metrics, self.plan.mlflow_names), self.state.step)
            self._log(f"eval at step {self.state.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _sync(self) -> bool:
        """Read the pending losses into metrics.jsonl, agree on a stop (one all-reduce); True: stop here."""
        self.progress.flush()
        return self.stop.agreed(self.device)

    def _record(self, loss: torch.Tensor, patch_side: int, flops: float) -> None:
        if not self.progress.record(self.state.step, loss, patch_side, self.last_lr, flops):
            return
        h, w = self.model_cfg.grid
        metrics = self.progress.window_metrics(self.env.world_size, self.loop.global_batch, h * w,
                                               peak_flops(self.device), self.engine.get_global_grad_norm())
        metrics.update(lr=self.last_lr, patch_side=patch_side, train_flops=self.state.train_flops,
                       epoch=self.state.step / max(1, self.plan.steps_per_epoch), bad_steps=self.bad.total)
        with self.progress.exclude("log"):
            self.tracker.log(record.mlflow_names(metrics, patch_side, self.plan.mlflow_names), self.state.step)
            self.progress.line(self.state.step, metrics, self._log)

    def _save(self) -> None:
        self.progress.flush()  # every record up to the checkpoint's step is on disk before it
        self.progress.global_counters()  # a collective: every rank saves at the same step
        self.state.bad_steps = self.bad.total
        self.state.corrupt_shards, self.state.train_hours = self.progress.totals()
        self.state.mlflow_run_id, self.state.world_size = self.tracker.run_id, self.env.world_size
        self.state.data_layout = self.feed.layout()
        checkpointing.save(self.engine, self.run, self.state.step, self.state.client_state(), self.env, self.ema,
                           self.loop.keep, frozenset(map(tag_for, self.cadence.keep_steps)))

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[npp train] {msg}", flush=True)


def train(plan: TrainPlan, evaluator=None) -> bool:
    """Train a GPT on a shard set with DeepSpeed and the NPP schedule; resumes from the run directory.
    True when it stopped on request (saved; a requeue resumes it), False when it reached the end."""
    return bool(Trainer(plan, evaluator).train().get("stopped"))
