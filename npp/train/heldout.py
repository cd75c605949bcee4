"""The held-out loss: next-token cross-entropy (k = 1) on the shard set's held-out split, whatever stage trains.

FID on a few hundred samples is noisy; the loss on a fixed held-out set is not, and at k = 1 it
is the same quantity for an NPP run in any stage and for an NTP run, so the two compare at every
point (`val/loss_k1`). The held-out shards (`npp tokenize run --val-share`) are never trained on.
Each sample's first view (the center crop) is scored, with the training weights in eval mode (no
dropout, no label dropout: nothing draws from an RNG, so exact resume holds). Ranks score the
samples i % world == rank and one all-reduce sums them; every rank runs the same number of
forwards (a short slice is padded with weight-0 rows), as ZeRO-3's parameter gathering needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from npp.pipeline.shards import iter_tar_samples
from npp.runtime.metric_names import HELDOUT
from npp.train.distributed import all_sum

METRIC = HELDOUT


class HeldOutLoss:
    METRIC = METRIC

    @classmethod
    def of(cls, rows: list[dict], env, batch: int, device: torch.device) -> HeldOutLoss | None:
        """The held-out loss of a run whose shard set has held-out shards (`rows`), for this rank; else None."""
        return cls(rows, env.rank, env.world_size, batch, device) if rows else None

    def __init__(self, rows: list[dict], rank: int, world: int, batch: int, device: torch.device):
        """`rows`: the held-out shards (npp.pipeline.shards.heldout_shards); `batch`: samples per forward."""
        self.rows, self.rank, self.world, self.batch, self.device = rows, rank, world, max(1, batch), device
        self._data: tuple[np.ndarray, np.ndarray, int] | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes (n, h·w), labels (n,) of the whole held-out set, the indices this rank scores), read once."""
        if self._data is None:
            codes, labels = [], []
            for row in self.rows:
                for s in iter_tar_samples(row["path"]):
                    codes.append(s.codes[0].reshape(-1).astype(np.int64))
                    labels.append(s.label)
            self._data = (np.stack(codes) if codes else np.zeros((0, 0), np.int64), np.asarray(labels, np.int64),
                          np.arange(self.rank, len(codes), self.world))
        return self._data

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[float, int]:
        """(mean next-token cross-entropy per token over the whole held-out set, samples scored) on every rank."""
        codes, labels, mine = self._load()
        if not len(codes):
            return float("nan"), 0
        batches = math.ceil(math.ceil(len(codes) / self.world) / self.batch)
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for b in range(batches):
                pos = np.arange(b * self.batch, (b + 1) * self.batch)
                weight = torch.from_numpy((pos < len(mine)).astype(np.float64)).to(self.device)
                ids = mine[np.minimum(pos, len(mine) - 1)] if len(mine) else np.zeros(len(pos), np.int64)
                idx = torch.from_numpy(codes[ids]).to(self.device)
                logits, _ = model(idx, torch.from_numpy(labels[ids]).to(self.device), targets=idx, patch=1)
                logp = F.log_softmax(logits.float(), dim=-1)
                per_sample = -logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1).mean(dim=1)
                loss_sum += (per_sample.double() * weight).sum()
        finally:
            model.train(was_training)
        return all_sum([float(loss_sum)], self.device)[0] / len(codes), len(codes)
