"""`npp train`: training, with the evaluator of the eval stage handed over when --eval-every asks for one.

The train stage sees only a callable (npp.train.trainer.Trainer's `evaluator`); this is where the
two stages meet.
"""

from __future__ import annotations


def train_with_evaluation(cfg) -> None:
    """Train; with --eval-every (or --eval-every-epochs), build the eval stage's evaluator from cfg.eval_spec()."""
    from npp.train.trainer import train

    evaluator = None
    if cfg.evaluates:
        from npp.eval.during_training import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg.eval_spec())
    train(cfg, evaluator)
