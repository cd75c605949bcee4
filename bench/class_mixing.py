"""Distinct classes per micro-batch and per global batch, for ImageNet's shape, against i.i.d.

ImageNet's shape at 1/10 of its size, every ratio that matters kept: 1000 classes of
128 images listed class by class (as an ImageFolder tree is), shards of 100 (ImageNet:
1000 of ~1281 per class), a shuffle buffer of 5 shards, 8 ranks x 7 loader workers
(~23 shards per worker and data epoch, as 1281 shards give on 8x7), micro-batch 32,
global batch 256. Two shard layouts: the one `npp tokenize` writes (inputs dealt in a
seeded permutation) and shards cut from the class-sorted list (other tools); each read
in data order 1 (runs begun before order 2: each loader worker its own shards) and in
data order 2 (one order for the whole job, npp.pipeline.global_order), with one shard's
samples mixed at a time (mix 1), 16 (the default) and, for order 2, 256 (in order 2 a
larger --mix-shards costs page cache, not worker memory). The batches are those the
real stream yields, replayed in-process (npp.pipeline.mixing).

    .venv/bin/python bench/class_mixing.py [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from npp.pipeline.mixing import measure_mixing
from npp.pipeline.shards import Sample, encode_tar
from npp.tokenize.run import shard_assignment

CLASSES, PER_CLASS, PER_SHARD = 1000, 128, 100


def write_set(root: Path, order: list[np.ndarray], labels: np.ndarray) -> list[str]:
    root.mkdir(parents=True)
    paths = []
    for s, idx in enumerate(order):
        samples = [Sample(f"img{i:07d}", np.zeros((1, 1, 1), np.uint16), int(labels[i])) for i in idx]
        path = root / f"train-{s:06d}.tar"
        path.write_bytes(encode_tar(samples))
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)  # the class-sorted input list
    n = len(labels)
    layouts = {
        "npp tokenize (seeded permutation)": shard_assignment(n, PER_SHARD, seed=0),
        "cut from the class-sorted list": [np.arange(i, min(n, i + PER_SHARD)) for i in range(0, n, PER_SHARD)],
    }
    shape = dict(world=8, workers=7, micro_batch=32, steps=args.steps, shuffle_buffer=5 * PER_SHARD)
    counts = {c: PER_CLASS for c in range(CLASSES)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, order) in enumerate(layouts.items()):
            t0 = time.perf_counter()
            paths = write_set(Path(tmp) / f"set{i}", order, labels)
            print(f"wrote {len(paths)} shards ({name}) in {time.perf_counter() - t0:.1f} s", flush=True)
            for data_order, mix in ((1, 1), (1, 16), (2, 1), (2, 16), (2, 256)):
                m = measure_mixing(paths, [len(o) for o in order], counts, mix_shards=mix, order=data_order, **shape)
                rows.append((name, data_order, mix, m))
                print(f"  order {data_order}, mix {mix:>3}: micro-batch {m['micro']:.1f} / {m['micro_iid']:.1f} i.i.d. "
                      f"({m['micro'] / m['micro_iid']:.0%}), global batch {m['global']:.1f} / {m['global_iid']:.1f} "
                      f"({m['global'] / m['global_iid']:.0%})", flush=True)
    print("\n| shards | data order | mixed at once | classes / micro-batch of 32 | classes / global batch of 256 |")
    print("|---|---|---|---|---|")
    for name, data_order, mix, m in rows:
        print(f"| {name} | {data_order} | {mix} | {m['micro']:.1f} ({m['micro'] / m['micro_iid']:.0%} of i.i.d. "
              f"{m['micro_iid']:.1f}) "
              f"| {m['global']:.1f} ({m['global'] / m['global_iid']:.0%} of i.i.d. {m['global_iid']:.1f}) |")


if __name__ == "__main__":
    main()
