"""When the loop syncs, evaluates and checkpoints: functions of the step alone, so every rank agrees.

Sync points (a host read of the pending losses and one all-reduce to agree on a stop) are
every --sync-every steps and every log, checkpoint and eval step, the last step, and any
step DeepSpeed skipped (the same on every rank). Evaluations every `eval_every` steps and
at the last step; checkpoints every --ckpt-every steps before the last (the end saves anyway), and at
the branch points of --branch-epochs (kept beyond --keep: npp.train.branching).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cadence:
    total_steps: int
    sync_every: int
    log_every: int
    ckpt_every: int
    eval_every: int  # 0: no evaluation
    keep_steps: frozenset = field(default_factory=frozenset)  # checkpoints that are kept (branch points)

    def eval_due(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.total_steps)

    def sync_due(self, step: int, skipped: bool = False) -> bool:
        return (skipped or step % self.sync_every == 0 or step % self.log_every == 0 or self.ckpt_due(step)
                or self.eval_due(step) or step == self.total_steps)

    def ckpt_due(self, step: int) -> bool:
        return (step % self.ckpt_every == 0 or step in self.keep_steps) and step < self.total_steps
