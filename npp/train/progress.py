"""Per-step records and periodic metrics of a training run, each step exactly once.

`metrics.jsonl` (rank 0) gets one line per optimizer step (and one per held-out loss: `note`). The losses stay on the
device until a sync point (`flush`, every --sync-every steps and at log, checkpoint
and eval steps): reading a loss per step would stall the host until the GPU caught
up, and at k=4 a GPT-B micro-step is about a millisecond of GPU work. A resumed run redoes the
steps between its checkpoint and the interruption, so on resume the file is cut
back to the checkpoint's step first; MLflow keeps points it already has (its
history cannot be edited), so the tracker sends no point of a metric at a step it
already holds (npp.runtime.outbox). Since resume is exact the redone values equal
the ones kept. Counters that mean something for the whole job (corrupt shards) are
summed over ranks at each log step, in the same collective as the loss.

Throughput is step time only: checkpoint saves, evaluations and the logging itself are
timed apart (`exclude`) and reported beside it (`ckpt_s`, `eval_s`, `log_s` of the
window), so a save does not show up as a slow interval of training.

Each log line says where the run is: `step=N/TOTAL`, the time since this start, and an ETA.
The ETA prices the FLOPs left (NPP's stages differ up to ~10x in cost per step, so a step rate
from a k=4 stage would badly misjudge the k=1 stage) at the seconds per FLOP measured over this
start's training steps, plus the checkpoint and eval seconds per FLOP measured alike: those are
excluded from the rate and included in the ETA. On a terminal the lines go above a tqdm bar; in a
log file (SLURM) they are plain lines.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from npp.runtime.files import truncate_jsonl
from npp.train.distributed import all_sum


class Progress:
    EXCLUDED = ("ckpt", "eval", "log")  # time spent outside training steps, per window

    def __init__(self, path: Path, is_main: bool, device: torch.device, log_every: int, total_steps: int,
                 corrupt_base: int = 0, clock: Callable[[], float] = time.perf_counter,
                 flops_left: Callable[[int], float] | None = None, hours_base: float = 0.0):
        self.path = Path(path)  # RUN/metrics.jsonl (npp.pipeline.runs.RunFolder.metrics)
        self.is_main, self.device = is_main, device
        self.log_every, self.total_steps = log_every, total_steps
        self.corrupt_base = corrupt_base  # global count at the checkpoint we resumed from
        self.corrupt_local = 0  # skipped by this rank's stream since this process started
        self.corrupt_total = corrupt_base
        self.pending: list[tuple[int, torch.Tensor, int, float]] = []  # (step, loss on the device, k, lr)
        self.clock = clock
        self.flops_left = flops_left  # step -> training FLOPs from that step to the end (all samples)
        self.started = clock()
        self.run_step_s = self.run_other_s = self.run_flops = 0.0  # this start's totals, for the ETA
        self.hours_base = hours_base  # hours in training steps up to the checkpoint this start resumed from
        self.bar = None
        self.watchdog = None
        self._step = 0  # the last step recorded
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []  # flushed losses of the steps since the last log step
        self.t0, self.steps, self.flops = self.clock(), 0, 0.0
        self.excluded = dict.fromkeys(self.EXCLUDED, 0.0)

    def begin(self, batches):
        """Start the first window's clock now, when the loop starts: the set-up before it (MLflow, the loader's
        start, a checkpoint's load) is not step time, in `step_s` or in `train_hours`. Returns `batches`."""
        self._reset()
        return batches

    def watch(self, watchdog) -> None:
        """Report progress to a watchdog (npp.train.watchdog): every recorded step and completed save beats it, an
        evaluation pauses it; `unwatch` stops it."""
        self.watchdog = watchdog
        watchdog.start(self._step)

    def unwatch(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    @contextlib.contextmanager
    def exclude(self, kind: str):
        """Time spent in the block (a save, an eval, logging) is reported as `<kind>_s`, not as step time."""
        start = self.clock()
        paused = self.watchdog.pause() if self.watchdog is not None and kind == "eval" else contextlib.nullcontext()
        try:
            with paused:
                yield
            if kind == "ckpt" and self.watchdog is not None:
                self.watchdog.beat(self._step)  # a completed save is progress
        finally:
            self.excluded[kind] += self.clock() - start

    def resume_at(self, step: int) -> None:
        self._step = step
        if self.is_main and step:
            dropped = truncate_jsonl(self.path, step)
            if dropped:
                print(
                    f"[npp train] metrics.jsonl: dropped {dropped} record(s) after step {step} (redone now)", flush=True
                )

    def record(self, step: int, loss: torch.Tensor, patch_side: int, lr: float, flops: float) -> bool:
        """Keep the step's record (its loss a device tensor: no host sync); True when this step is a log
        step (every rank agrees)."""
        self.pending.append((step, loss.detach(), patch_side, lr))
        self._step = step
        if self.watchdog is not None:
            self.watchdog.beat(step)
        self.steps += 1
        self.flops += flops
        return step % self.log_every == 0 or step == self.total_steps

    def flush(self) -> None:
        """Read the pending losses in one host transfer and append their records to metrics.jsonl."""
        if not self.pending:
            return
        values = torch.stack([loss.float() for _, loss, _, _ in self.pending]).tolist()
        self.losses += values
        if self.is_main:
            with open(self.path, "a") as fh:
                for (step, _, patch_side, lr), loss in zip(self.pending, values, strict=False):
                    fh.write(json.dumps({"step": step, "loss": loss, "patch_side": patch_side, "lr": lr}) + "\n")
        self.pending = []

    def note(self, step: int, values: dict) -> None:
        """A record of measurements at `step` beside the step's own (the held-out loss): {"step", **values}."""
        if self.is_main and values:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    def global_counters(self, loss: float = 0.0) -> float:
        """Sum (loss, this rank's corrupt shards) over ranks in one collective (every rank calls it at the same
        step); updates the job's corrupt-shard total and returns the summed loss."""
        loss_sum, corrupt = all_sum([loss, float(self.corrupt_local)], self.device)
        self.corrupt_total = self.corrupt_base + int(corrupt)
        return loss_sum

    def window_metrics(self, world_size: int, global_batch: int, tokens_per_sample: int,
                       peak: float | None, grad_norm) -> dict:
        """Metrics over the steps since the last log step; a collective (loss mean, counters)."""
        self.flush()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        outside = sum(self.excluded.values())
        dt = max(self.clock() - self.t0 - outside, 1e-9)  # time in training steps alone
        loss_sum = self.global_counters(float(np.mean(self.losses)))
        samples_s = self.steps * global_batch / dt
        metrics = {"loss": loss_sum / world_size, "samples_per_s": samples_s,
                   "tokens_per_s": samples_s * tokens_per_sample, "step_s": dt / max(1, self.steps),
                   **{f"{kind}_s": t for kind, t in self.excluded.items()}, "corrupt_shards": self.corrupt_total}
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        if peak:
            metrics["mfu"] = self.flops / dt / (peak * world_size)
        self.run_step_s += dt
        self.run_other_s += self.excluded["ckpt"] + self.excluded["eval"]
        self.run_flops += self.flops
        self._reset()
        metrics["train_hours"] = self.train_hours()
        return metrics

    def skipped_shards(self, batch: dict, rank: int) -> None:
        """Say and count the shards the data stream skipped in a batch training takes (one line per shard, each
        counted once: only the consumer of a batch knows it was used)."""
        for shard in batch.get("skipped", ()):
            print(f"[npp train] rank {rank}: warning: skipped corrupt shard {shard}", flush=True)
        self.corrupt_local += batch["corrupt"]

    def totals(self) -> tuple[int, float]:
        """(corrupt shards of the job, training hours) for the checkpoint's state."""
        return self.corrupt_total, self.train_hours()

    def train_hours(self) -> float:
        """Hours spent in training steps to this step, over every start (saves, evaluations, logging, restarts and
        the steps redone after a failure not counted): what "hours of training" means beside train_flops."""
        window = self.clock() - self.t0 - sum(self.excluded.values())
        return self.hours_base + (self.run_step_s + max(0.0, window)) / 3600

    def eta_s(self, step: int) -> float | None:
        """Seconds to the end: the FLOPs left at this start's measured seconds per FLOP (steps, then checkpoints
        and evaluations); None before anything was measured."""
        if self.flops_left is None or self.run_flops <= 0:
            return None
        return self.flops_left(step) * (self.run_step_s + self.run_other_s) / self.run_flops

    def line(self, step: int, metrics: dict, log: Callable[[str], None]) -> None:
        """The log step's line: step/total, elapsed since this start, ETA, then the metrics."""
        eta = self.eta_s(step)
        head = {"step": f"{step}/{self.total_steps}", "elapsed": _hms(self.clock() - self.started),
                **({"eta": _hms(eta)} if eta is not None else {})}
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in {**head, **metrics}.items())
        if self.is_main and sys.stdout.isatty():  # a terminal: the line above a bar
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=self.total_steps, initial=step, unit="step", desc="npp train", dynamic_ncols=True)
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4g}", eta=head.get("eta", "?"))
            self.bar.write(f"[npp train] {text}")
        else:
            log(text)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
