"""Optimizer steps DeepSpeed skipped because a gradient was not finite: counted, warned, bounded.

The trainer never reads a loss to decide whether to step (that would stall the host
every micro-step). A non-finite loss on any rank makes the all-reduced gradients
non-finite; DeepSpeed's ZeRO optimizers (stages 1-3) and its bf16 optimizer then find
the global gradient norm invalid and skip the update: weights, Adam moments and the LR
schedule are left as they were, and every rank learns so from the same collective
(`engine.was_step_applied()`). Such a step is not counted as a training step; its
micro-batches are consumed (the data position moves on, so a resumed run replays it
exactly). `ds_config.check_skips_non_finite` refuses the configurations where
DeepSpeed would apply the update instead.
"""

from __future__ import annotations

from collections.abc import Callable

from npp.train.errors import TrainingError


class BadSteps:
    def __init__(self, total: int, max_streak: int):
        self.total = total  # skipped steps over the whole run (saved in the checkpoint)
        self.max_streak = max_streak
        self.streak = 0

    def applied(self) -> None:
        self.streak = 0

    def skipped(self, step: int, last_good: Callable[[], str], log: Callable[[str], None]) -> None:
        """Count a skipped step; raise when --max-bad-steps of them came in a row."""
        self.total += 1
        self.streak += 1
        log(f"warning: non-finite gradient at step {step}: DeepSpeed skipped the optimizer step (weights, optimizer "
            f"state and LR unchanged; its micro-batches are consumed), {self.streak} in a row")
        if self.streak >= self.max_streak:
            raise TrainingError(
                f"{self.streak} consecutive non-finite steps at step {step}: stopping. The last good checkpoint is "
                f"{last_good()}; lower --lr (with --allow-change lr) or check the data"
            )
