"""`npp train`: training, with the evaluator of the eval stage handed over when --eval-every asks for one.

The train stage sees only a callable (npp.train.trainer.Trainer's `evaluator`); this is where the
two stages meet.
"""

from __future__ import annotations


def train_with_evaluation(plan) -> None:
    """Train the plan (npp.train.plan.TrainPlan); with --eval-every (or --eval-every-epochs), build the eval
    stage's evaluator from the plan's eval spec (checked already)."""
    from npp.train.trainer import train

    evaluator = None
    if plan.eval_spec is not None:
        from npp.eval.during_training import TrainingEvaluator

        evaluator = TrainingEvaluator(plan.eval_spec)
    train(plan, evaluator)
    from npp.runtime.workers import exit_now

    exit_now(0)  # saved, stopped or finished: exit 0 (a stop exits 0 for the requeue) without the teardown
