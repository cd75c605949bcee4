"""Evaluation during training: the model to sample (the EMA when there is one, on every rank) and the RNG
streams around it, so an evaluation never changes what training does (exact resume holds with evals on);
and the held-out loss (npp.train.heldout), at every eval point and at the last step.

The evaluator itself is the eval stage's (npp.eval.during_training), handed in by the app.
"""

from __future__ import annotations

import torch

from npp.models.gpt import GPT
from npp.pipeline.eval_spec import protocol_tags
from npp.train import checkpointing
from npp.train.ema import PartitionedEMA
from npp.train.heldout import METRIC as HELDOUT_METRIC
from npp.train.heldout import HeldOutLoss


class EvalPoints:
    def __init__(self, evaluator, model_cfg, device, rank: int, world_size: int, heldout: HeldOutLoss | None = None):
        self.evaluator, self.model_cfg, self.device = evaluator, model_cfg, device
        self.rank, self.world_size, self.heldout = rank, world_size, heldout
        self._ema_copy = None

    def due(self, cadence, step: int) -> bool:
        """An eval point of --eval-every, or the last step when there is a held-out loss to measure."""
        return cadence.eval_due(step) or (self.heldout is not None and step == cadence.total_steps)

    def __call__(self, module, ema, sample: bool = True) -> dict:
        """Every rank samples its pieces (when `sample`) and scores its share of the held-out set; the metrics
        (rank 0's) of the model now. `module`: the trained model (the engine's), `ema` its average or None."""
        rng = checkpointing.rng_state()
        metrics = {}
        if sample and self.evaluator is not None:
            metrics = self.evaluator(self._sampling_model(module, ema), self.model_cfg.num_classes, self.device,
                                     self.rank, self.world_size)
        if self.heldout is not None:
            metrics[HELDOUT_METRIC] = self.heldout(module)[0]
        checkpointing.set_rng_state(rng)
        return metrics if self.rank == 0 else {}

    def protocol_tags(self, metrics: dict) -> dict:
        """The evaluator's protocol (npp.pipeline.eval_spec) as the tag of each FID it returned."""
        return protocol_tags(getattr(self.evaluator, "protocol", None), metrics)

    def _sampling_model(self, module, ema):
        if ema is None:
            return module
        if isinstance(ema, PartitionedEMA):  # partitioned over the ranks: gathered into a whole model on every rank,
            return ema.full_model(self.model_cfg, self.device)  # dropped after the point (the sampler keeps a copy)
        if self.world_size == 1:
            return ema.model
        # the EMA lives on rank 0: every rank samples with a copy of it
        if ema.model is not None:
            model = ema.model
        else:
            if self._ema_copy is None:
                self._ema_copy = GPT(self.model_cfg).to(self.device).eval()
            model = self._ema_copy
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)
        return model
