"""How a set of samples is cut into pieces and shared among processes: the one protocol `npp sample` and the
evaluations during training both follow.

Sample j has a fixed label (class-balanced: j // per_class) and the seed `seed·1000003 + j`
(npp.models.generate), so what is made depends neither on the batch nor on the number of
processes. The samples are cut into pieces of `batch`; the process of rank r makes the pieces
p with p % world == r.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    """per_class samples of every class, class by class."""
    return np.repeat(np.arange(num_classes), per_class)


def count_pieces(n: int, batch: int) -> int:
    return (n + batch - 1) // batch


def piece_ids(p: int, n: int, batch: int) -> np.ndarray:
    """The sample ids of piece p."""
    return np.arange(p * batch, min((p + 1) * batch, n))


def pieces_of_rank(n: int, batch: int, rank: int, world: int) -> Iterator[tuple[int, np.ndarray]]:
    """(piece, its sample ids) for the pieces this rank makes."""
    for p in range(rank, count_pieces(n, batch), world):
        yield p, piece_ids(p, n, batch)
