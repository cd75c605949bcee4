"""The training data's order, the same for any number of ranks and loader workers ("data order 2").

A run resumed on another number of GPUs, and two runs of one seed on different GPU counts,
must see the same samples per optimizer step, or their curves differ for a reason that
is not the model (MosaicML Streaming calls this elastic determinism). So the order of
data epoch e is a function of the seed, e and the shards' sample counts only:

1. a seeded permutation of the shards;
2. blocks of `mix_shards` consecutive shards of it, each block's samples in a random
   order (a set cut from a class-sorted list still gets batches of several classes);
3. a shuffle buffer of `shuffle_buffer` samples over that sequence, simulated on sample
   numbers (so its size costs no worker memory);
4. one uniform number per position, which picks the sample's view.

Position p of a run (counted from the first sample of data epoch 0) is position p % N of
epoch p // N. Micro-batch m of rank r of R, micro-batch size B, holds positions
(m·R + r)·B … (m·R + r + 1)·B, so optimizer step t of global batch G = R·B·A
(A accumulation steps) holds positions [tG, (t+1)G) on any layout. A DataLoader's
process w of W builds micro-batches w, w+W, ... of its rank, reading each sample where it
lies: every worker indexes the shards it needs (npp.pipeline.tar_reader.index_shard, a
few bytes per sample, once per process) and maps them read-only (npp.pipeline.global_stream; this
module is numpy only, so the plan can name the order before torch is imported).

Resume is arithmetic: a start continues at the position it was given (the trainer
counts micro-batches × R × B since the last start), whatever the old layout was.

Corrupt shards: see npp.pipeline.global_stream.
"""

from __future__ import annotations

import numpy as np

ORDER = 2  # recorded in a run's config.json; runs without it keep npp.pipeline.stream's order (1)


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `size` emits n items (indices into its input): it fills, then each
    new item takes the slot of a random one, which is emitted; at the end the rest leave in a random order.

    Computed without the loop: the item emitted when item size+t arrives is the one last put into slot
    draws[t] before t: item size+t' for the latest t' < t that drew the same slot, else the slot's first item.
    """
    size = max(1, min(size, n))
    draws = rng.integers(size, size=max(0, n - size))
    by_slot = np.argsort(draws, kind="stable")  # time order within each slot
    slots = draws[by_slot]
    repeat = np.zeros(len(by_slot), bool)
    repeat[1:] = slots[1:] == slots[:-1]
    previous = np.full(len(draws), -1, np.int64)
    previous[by_slot[repeat]] = by_slot[np.flatnonzero(repeat) - 1]
    emitted = np.where(previous >= 0, size + previous, draws)
    final = np.arange(size, dtype=np.int64)
    last = np.ones(len(by_slot), bool)
    last[:-1] = ~repeat[1:]
    final[slots[last]] = size + by_slot[last]
    return np.concatenate([emitted, final[rng.permutation(size)]])[:n]


def epoch_order(counts: list[int], seed: int, epoch: int, shuffle_buffer: int,
                mix_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample numbers, view draws in [0, 1)) of data epoch `epoch`; sample number = the sum of the earlier
    shards' counts + the index in its shard."""
    counts = np.asarray(counts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shards = np.random.default_rng([seed, epoch]).permutation(len(counts))
    block_rng = np.random.default_rng([seed, epoch, 1])
    pieces = []
    for start in range(0, len(shards), max(1, mix_shards)):
        numbers = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards[start : start + mix_shards]])
        pieces.append(numbers[block_rng.permutation(len(numbers))])
    sequence = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    sequence = sequence[shuffle_buffer_order(len(sequence), shuffle_buffer, np.random.default_rng([seed, epoch, 2]))]
    views = np.random.default_rng([seed, epoch, 3]).random(len(sequence), dtype=np.float32)
    return sequence, views
