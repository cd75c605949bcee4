"""The evaluation points on their own (npp.train.eval_points): when one is due, which model is sampled (the EMA when
there is one), and that an evaluation leaves every random stream as it found it, so a run with --eval-every trains
the same steps as one without. The evaluator is the seam the app fills (npp.eval.during_training); here a function
that draws from every generator and records the model it was handed; the held-out loss is the real one on the
held-out shard set. The whole path, with DeepSpeed and the real evaluator, is tests/eval/test_during_training.py."""

import random

import numpy as np
import torch

from npp.pipeline.eval_spec import PROTOCOL_TAG
from npp.pipeline.shards import heldout_shards
from npp.train.cadence import Cadence
from npp.train.ema import EMA
from npp.train.eval_points import EvalPoints
from npp.train.heldout import METRIC, HeldOutLoss
from tests.helpers import make_gpt


class Evaluator:
    """Samples as an evaluator does: draws from torch, numpy and Python's generators, then returns a FID."""

    protocol = {"per_class": 2, "cfg_scale": 1.5}

    def __init__(self):
        self.models = []

    def __call__(self, model, num_classes, device, rank, world_size):
        self.models.append(model)
        torch.rand(3), np.random.rand(3), random.random()
        return {"fid": 12.5}


def draws():
    return torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()


def test_an_eval_point_samples_the_ema_and_leaves_every_random_stream_as_it_was(heldout_shard_set):
    model = make_gpt(num_classes=10).train()
    ema = EMA(model, decay=0.9)
    heldout = HeldOutLoss(heldout_shards(str(heldout_shard_set)), 0, 1, 4, torch.device("cpu"))
    evaluator = Evaluator()
    points = EvalPoints(evaluator, model.config, torch.device("cpu"), 0, 1, heldout)

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = draws()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    metrics = points(model, ema)
    assert draws() == expected  # sampling drew from every generator, training's streams did not move
    assert evaluator.models == [ema.model]  # the average is sampled, not the trained weights
    assert metrics["fid"] == 12.5 and np.isfinite(metrics[METRIC]) and model.training  # scored in eval mode, back
    assert points.protocol_tags(metrics) == {PROTOCOL_TAG + "fid": '{"cfg_scale": 1.5, "per_class": 2}'}

    assert set(points(model, None, sample=False)) == {METRIC} and len(evaluator.models) == 1  # the last step only
    points(model, None)
    assert evaluator.models[-1] is model  # no EMA: the trained weights
    other_rank = EvalPoints(evaluator, model.config, torch.device("cpu"), 1, 1, heldout)
    assert other_rank(model, ema) == {}  # every rank samples its pieces, rank 0 reports


def test_a_point_is_due_at_the_cadence_and_at_the_end_when_a_held_out_loss_is_measured():
    model = make_gpt()
    cadence = Cadence(total_steps=20, sync_every=1, log_every=5, ckpt_every=5, eval_every=0)
    without = EvalPoints(Evaluator(), model.config, torch.device("cpu"), 0, 1)
    assert [s for s in range(1, 21) if without.due(cadence, s)] == []
    heldout = HeldOutLoss([{"path": "unused.tar"}], 0, 1, 4, torch.device("cpu"))  # not read until it scores
    with_loss = EvalPoints(Evaluator(), model.config, torch.device("cpu"), 0, 1, heldout)
    assert [s for s in range(1, 21) if with_loss.due(cadence, s)] == [20]
    every = Cadence(total_steps=20, sync_every=1, log_every=5, ckpt_every=5, eval_every=8)
    assert [s for s in range(1, 21) if without.due(every, s)] == [8, 16, 20]
