"""FID while training: the evaluation the trainer calls at its eval points (built here, handed over by cli.py).

So the training run in MLflow holds FID (and IS, precision/recall, class accuracy with
a classifier) as a curve against cumulative training FLOPs, and NPP and NTP runs
compare like with like: every eval point samples the same class-balanced labels with
the same seeds (sample j uses seed `seed·1000003 + j`, as `npp sample` does), in every
run, on any number of ranks. Ranks sample the pieces p % world == rank through one
`Sampler` per model (its KV caches and, on CUDA, its graph-captured token step are
kept from one eval point to the next), extract features locally, and rank 0 gathers
them and computes the metrics against the reference. The train stage only sees a callable
`(model, num_classes, device, rank, world) -> metrics` and does not import this stage.

The metrics are named `curve/<metric>` (`curve/fid_toynet`, `curve/eval_seconds`): a
curve's points all come from the same small fixed sample set, while `npp eval` on a
final checkpoint (usually 50,000 samples) logs plain `fid`; FID depends on the
sample count, so the two must not share a series. MLflow's UI groups `curve/`.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from npp.eval.evaluate import metrics_from_features
from npp.eval.features import extract, load_feature_net
from npp.eval.reference import ReferenceError, reference_for
from npp.models.checkpoint import load_vq
from npp.models.generate import Sampler
from npp.pipeline.images import to_uint8_images


class TrainingEvaluator:
    def __init__(self, vq: str, ref: str, inception: Optional[str] = None, classifier: Optional[str] = None,
                 per_class: int = 10, cfg_scale: float = 2.0, temperature: float = 1.0, top_k: int = 0,
                 batch: int = 64, seed: int = 0, compile: Optional[bool] = None):
        if not vq or not ref or not (inception or classifier):
            raise ReferenceError("--eval-every needs --vq (the run's tokenizer), --eval-ref REF.npz and a feature "
                                 "network (--inception PATH or --classifier toynet.pt)")
        self.vq, _ = load_vq(vq)
        self.net = load_feature_net(inception, classifier)
        self.ref = reference_for(self.net, ref)
        self.per_class, self.cfg_scale, self.temperature, self.top_k = per_class, cfg_scale, temperature, top_k
        self.batch, self.seed = batch, seed
        self.compile = compile
        self._samplers: dict = {}
        self.settings = {"eval_per_class": per_class, "eval_cfg": cfg_scale, "eval_temperature": temperature,
                         "eval_top_k": top_k, "eval_seed": seed, "eval_ref": ref, "eval_net": self.net.name}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, num_classes: int, device: torch.device, rank: int, world: int) -> dict:
        t0 = time.time()
        labels = np.repeat(np.arange(num_classes), self.per_class)
        pieces = (len(labels) + self.batch - 1) // self.batch
        vq = self.vq.to(device)
        mine: dict[int, dict] = {}
        sampler = self._sampler(model)
        for p in range(rank, pieces, world):
            ids = np.arange(p * self.batch, min((p + 1) * self.batch, len(labels)))
            lab = torch.from_numpy(labels[ids]).to(device)
            codes = sampler.generate(lab, cfg_scale=self.cfg_scale, seed=self.seed, sample_ids=ids)
            images = to_uint8_images(vq.decode_codes(codes).float())
            mine[p] = extract(self.net, images, device=device, desc=f"eval features piece {p}", progress=False)
        gathered = _gather(mine, world)
        if rank != 0:
            return {}
        order = sorted(gathered)
        feats = {k: np.concatenate([gathered[p][k] for p in order]) for k in ("pool", "spatial", "logits")}
        metrics = metrics_from_features(self.net, feats, self.ref, labels)
        metrics["eval_seconds"] = time.time() - t0
        metrics["eval_samples"] = float(len(labels))
        return {f"{CURVE}{k}": v for k, v in metrics.items()}


    def _sampler(self, model: torch.nn.Module) -> Sampler:
        """One Sampler per model object (the trainer hands the same EMA or module at every eval point)."""
        key = id(model)
        if key not in self._samplers or self._samplers[key].model is not model:
            self._samplers[key] = Sampler(model, self.batch, self.cfg_scale != 1.0, self.temperature, self.top_k,
                                          compile=self.compile)
        return self._samplers[key]


CURVE = "curve/"


def _gather(mine: dict, world: int) -> dict:
    if world == 1 or not torch.distributed.is_initialized():
        return mine
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    out: dict = {}
    for part in parts:
        out.update(part)
    return out
