"""The NPP training schedule: patch side per step, per-stage learning rate, cost.

A schedule is a list of stages (patch side k, share of the training budget). The
budget is counted in optimizer steps; shares are kept as exact fractions so the
paper's epoch boundaries (e.g. 37/75/150/300 of 300 epochs) land on exact steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from npp.errors import ConfigError
from npp.models.configs import GPTConfig, check_patch_side, train_flops_per_sample


@dataclass(frozen=True)
class Stage:
    patch_side: int
    share: Fraction

    def __str__(self) -> str:
        return f"{self.patch_side}:{float(self.share):g}"


def format_schedule(stages: Sequence[Stage]) -> str:
    return ",".join(str(s) for s in stages)


def validate_schedule(stages: Sequence[Stage], grid: tuple[int, int] | None = None) -> list[Stage]:
    """Shares positive and summing to 1, the last stage k = 1, every k dividing the grid."""
    stages = list(stages)
    if not stages:
        raise ConfigError("the schedule is empty: give at least one stage, e.g. '1:1' for next-token training")
    for s in stages:
        if s.patch_side < 1:
            raise ConfigError(f"patch side {s.patch_side} in stage '{s}' must be a positive integer")
        if s.share <= 0:
            raise ConfigError(f"stage '{s}' has a share of {float(s.share):g}; every share must be positive")
    total = sum((s.share for s in stages), Fraction(0))
    if total != 1:
        raise ConfigError(
            f"the shares of schedule '{format_schedule(stages)}' sum to {float(total):g}, not 1: "
            "shares are fractions of the whole training budget"
        )
    if stages[-1].patch_side != 1:
        raise ConfigError(
            f"the last stage of '{format_schedule(stages)}' has patch side {stages[-1].patch_side}: "
            "it must be 1 so the final model predicts token by token, as sampling does"
        )
    if grid is not None:
        for s in stages:
            check_patch_side(grid, s.patch_side)
    return stages


def parse_schedule(text: str, grid: tuple[int, int] | None = None) -> list[Stage]:
    """Parse 'k:share,k:share,...' such as '4:0.25,2:0.25,1:0.5' (shares may be fractions like 1/3)."""
    stages = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            side, share = part.split(":")
            stages.append(Stage(int(side), Fraction(share.strip())))
        except ValueError:
            raise ConfigError(
                f"cannot read stage '{part}' of schedule '{text}': write patch_side:share, e.g. '4:0.25,2:0.25,1:0.5'"
            ) from None
    return validate_schedule(stages, grid)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """--warmup-epochs in whole optimizer steps: the one rule, for a run's plan and for where its branches begin."""
    return int(round(float(warmup_epochs) * max(1, steps_per_epoch)))


def paper_schedule(patch_levels: int, epoch_rate: float, epochs: int) -> list[Stage]:
    """The reference code's schedule: sides [2^(L-1), ..., 2, 1], stage i ending at int(E·r^(L-1-i)) epochs."""
    if patch_levels < 1:
        raise ConfigError(f"patch_levels must be >= 1, got {patch_levels}")
    if not 0 < epoch_rate < 1 and patch_levels > 1:
        raise ConfigError(f"epoch_rate must lie in (0, 1), got {epoch_rate}")
    sides = [2 ** (patch_levels - 1 - i) for i in range(patch_levels)]
    ends = [int(epochs * epoch_rate ** (patch_levels - 1 - i)) for i in range(patch_levels)]
    starts = [0] + ends[:-1]
    if any(e <= s for s, e in zip(starts, ends, strict=False)):
        raise ConfigError(f"{epochs} epochs at rate {epoch_rate} leave an empty stage (stage ends at epochs {ends})")
    return validate_schedule([Stage(k, Fraction(e - s, epochs)) for k, s, e in zip(sides, starts, ends, strict=False)])


def warmup_and_decay(length: int, warmup_steps: int, decay_ratio: float) -> tuple[float, float, float]:
    """(warmup steps, first decaying step as a float, decay steps) of a stage of `length` steps: the one formula
    `PatchSchedule.lr_at` and the branch points (`branch_step`) share, so they cannot disagree."""
    decay = length * decay_ratio
    return min(warmup_steps, max(length - decay, 0)), length - decay, decay


def branch_step(epochs: int, steps_per_epoch: int, warmup_steps: int, decay_ratio: float) -> int:
    """The step at which a single-stage run of `epochs` epochs starts to decay its learning rate.

    Before it, that run takes exactly the steps of any longer single-stage run with the same warmup (same
    learning rate, data order, dropout draws): so a checkpoint of the longer run after this many steps is the
    shorter run's state there, and training only the decay from it gives the shorter run (`npp train branch`).
    """
    length = int(epochs) * int(steps_per_epoch)
    _, decay_start, decay = warmup_and_decay(length, warmup_steps, decay_ratio)
    return length if decay <= 0 else min(length, math.ceil(decay_start))


def branch_points(stages: Sequence[Stage], epochs: int, steps_per_epoch: int, warmup_steps: int,
                  decay_ratio: float, branch_epochs: Sequence[int]) -> dict[int, int]:
    """{E': the step of its branch point} for shorter runs of E' epochs branched off an `epochs`-epoch run; refuses
    a point that is not on the constant part of the run's schedule (one line each)."""
    if not branch_epochs:
        return {}
    if len(stages) != 1:
        raise ConfigError(f"--branch-epochs needs a single-stage schedule such as '1:1' (this run's is "
                          f"'{format_schedule(stages)}'): a shorter run of a multi-stage schedule changes stage at "
                          "other steps, so no step of this run is a step of it")
    length = int(epochs) * int(steps_per_epoch)
    warmup, full_decay_start, _ = warmup_and_decay(length, warmup_steps, decay_ratio)
    points = {}
    for e in sorted(set(int(e) for e in branch_epochs)):
        if not 0 < e < epochs:
            raise ConfigError(f"--branch-epochs {e}: a branch is a shorter run, between 1 and {epochs - 1} epochs "
                              f"(--epochs is {epochs})")
        own_warmup, _, _ = warmup_and_decay(e * steps_per_epoch, warmup_steps, decay_ratio)
        step = branch_step(e, steps_per_epoch, warmup_steps, decay_ratio)
        if own_warmup != warmup or step < warmup:
            raise ConfigError(f"--branch-epochs {e}: a {e}-epoch run would start its decay at step {step}, before "
                              f"its warmup of {warmup:g} steps is over; branch at more epochs or warm up for less")
        if step >= full_decay_start:  # cannot happen for e < epochs; kept as the rule it is
            raise ConfigError(f"--branch-epochs {e}: step {step} is in this run's own decay")
        points[e] = step
    return points


def compute_matched_epochs(stages: Sequence[Stage], epochs: float, cfg: GPTConfig) -> float:
    """Epochs of next-token training that cost the training FLOPs of `epochs` epochs of this schedule."""
    return float(epochs) * schedule_cost_ratio(stages, cfg)


@dataclass(frozen=True)
class StageSpan:
    index: int
    patch_side: int
    start: int  # first step of the stage
    end: int  # one past its last step

    @property
    def length(self) -> int:
        return self.end - self.start


class PatchSchedule:
    """Stages laid out over `total_steps` optimizer steps."""

    def __init__(self, stages: Sequence[Stage], total_steps: int):
        self.stages = validate_schedule(stages)
        if total_steps < len(self.stages):
            raise ConfigError(f"{total_steps} steps cannot hold {len(self.stages)} stages")
        self.total_steps = int(total_steps)
        cum, self.spans = Fraction(0), []
        start = 0
        for i, s in enumerate(self.stages):
            cum += s.share
            end = round(cum * self.total_steps)
            if end <= start:
                raise ConfigError(f"stage '{s}' gets no step out of {total_steps}: train longer or raise its share")
            self.spans.append(StageSpan(i, s.patch_side, start, end))
            start = end

    def stage_at(self, step: int) -> StageSpan:
        """The stage that trains step `step` (0-based); steps past the end stay in the last stage."""
        for span in self.spans:
            if step < span.end:
                return span
        return self.spans[-1]

    def lr_at(
        self, step: int, base_lr: float, end_lr: float = 1e-5, warmup_steps: int = 0, decay_ratio: float = 0.2
    ) -> float:
        """Per-stage learning rate: linear warmup from 0, constant, linear decay to end_lr.

        The warmup restarts at every stage change (the reference code's `--scheduler`);
        decay covers the last `decay_ratio` of each stage. If warmup and decay do not
        fit in a short stage, the warmup is shortened.
        """
        span = self.stage_at(step)
        t = step - span.start
        warmup, decay_start, decay = warmup_and_decay(span.length, warmup_steps, decay_ratio)
        if t < warmup:
            return base_lr * t / warmup
        if t < decay_start or decay <= 0:
            return base_lr
        progress = min((t - decay_start) / decay, 1.0)
        return end_lr + (base_lr - end_lr) * (1.0 - progress)

    def flops_per_sample(self, cfg: GPTConfig) -> list[float]:
        return [train_flops_per_sample(cfg, s.patch_side) for s in self.stages]

    def flops_left(self, step: int, per_sample: Sequence[float]) -> float:
        """Training FLOPs per sample of the steps from `step` to the end (per_sample: flops_per_sample's list)."""
        return float(sum(max(0, span.end - max(step, span.start)) * per_sample[span.index] for span in self.spans))

    def cost_ratio(self, cfg: GPTConfig) -> float:
        """Training FLOPs of this schedule relative to next-token training on the same samples."""
        return schedule_cost_ratio(self.stages, cfg)

    def describe(self) -> str:
        return ", ".join(f"k={s.patch_side} steps [{s.start}, {s.end})" for s in self.spans)


def schedule_cost_ratio(stages: Sequence[Stage], cfg: GPTConfig) -> float:
    ntp = train_flops_per_sample(cfg, 1)
    return float(sum(float(s.share) * train_flops_per_sample(cfg, s.patch_side) for s in stages) / ntp)
