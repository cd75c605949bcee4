"""How class-mixed the training batches are, measured on the real stream.

A rank's DataLoader hands out its workers' batches round-robin, and a global batch
is the micro-batch of every rank at the same step; `measure_mixing` replays exactly
that in one process (each worker's stream is a pure function of its position) and
counts distinct classes. The reference is an i.i.d. draw from the class frequencies:
E[distinct] = sum_c 1 - (1 - p_c)^n. Used by the tests and bench/class_mixing.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from npp.pipeline.global_stream import GlobalStream
from npp.pipeline.stream import CodeStream


def iid_distinct(class_counts: dict[int, int], n: int) -> float:
    """Expected number of distinct classes among n i.i.d. draws with these class frequencies."""
    counts = np.asarray(list(class_counts.values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(np.sum(1.0 - (1.0 - p) ** n))


def rank_batches(stream: CodeStream | GlobalStream, workers: int, steps: int) -> list[np.ndarray]:
    """The labels of a rank's first `steps` micro-batches, in the DataLoader's round-robin order."""
    its = [stream.iter_worker(w, max(1, workers)) for w in range(max(1, workers))]
    return [next(its[b % len(its)])["labels"] for b in range(steps)]


def measure_mixing(shards: list[str], shard_samples: list[int], class_counts: dict[int, int], *, world: int,
                   workers: int, micro_batch: int, steps: int, shuffle_buffer: int, mix_shards: int = 16,
                   seed: int = 0, order: int = 2) -> dict:
    """Mean distinct classes per micro-batch and per global batch, and the i.i.d. expectations, in data order
    `order` (2: npp.pipeline.global_order; 1: npp.pipeline.stream's)."""
    kind = GlobalStream if order >= 2 else CodeStream
    per_rank = [
        rank_batches(kind(shards, shard_samples, micro_batch, rank=r, world=world, seed=seed,
                          shuffle_buffer=shuffle_buffer, num_workers=workers, mix_shards=mix_shards),
                     workers, steps)
        for r in range(world)
    ]
    micro = [len(set(b.tolist())) for batches in per_rank for b in batches]
    glob = [len(set(np.concatenate([per_rank[r][s] for r in range(world)]).tolist())) for s in range(steps)]
    return {
        "micro": float(np.mean(micro)),
        "micro_iid": iid_distinct(class_counts, micro_batch),
        "global": float(np.mean(glob)),
        "global_iid": iid_distinct(class_counts, micro_batch * world),
    }


def class_counts_of(labels) -> dict[int, int]:
    return dict(Counter(int(x) for x in labels))
