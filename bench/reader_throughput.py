"""npp's shard readers against plain `webdataset.WebDataset` on the same shards: samples/s per worker.

All read the same tars (written by `npp.pipeline.shards.encode_tar`, i.e. webdataset's TarWriter) in one
process (one loader worker's share of the work) and yield what a loader worker hands training: batches of
32 (one random view's codes, flattened, and the labels) as numpy arrays. npp order 1: `CodeStream` (the
order of runs started before data order 2: memory-mapped shards parsed in place, `--mix-shards`
interleaving, a shuffle buffer, a random view). npp order 2: `GlobalStream` (the layout-independent order:
every sample read where the global order puts it, through a per-process index of each shard), once as the
only worker and once as one of 8 workers, which must index every shard to build its eighth of the
batches (each timing includes building the indexes, in a fresh stream). webdataset:
`WebDataset(urls).decode()`, the same view pick and stacking (no shuffle buffer: that favours webdataset).
The two are timed alternately, three rounds each after a warm-up pass (the page cache holds the shards for
both); the figures printed are the median of each and their ratio.

    .venv/bin/python bench/reader_throughput.py [--views 20] [--shards 8] [--per-shard 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from npp.pipeline.global_stream import GlobalStream
from npp.pipeline.shards import Sample, encode_tar
from npp.pipeline.stream import CodeStream

BATCH = 32  # samples per batch, as a micro-batch


def write_shards(root: Path, shards: int, per_shard: int, views: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(shards):
        samples = [Sample(f"s{i:03d}_{j:05d}", rng.integers(0, 16384, (views, 16, 16), dtype=np.uint16), j % 1000)
                   for j in range(per_shard)]
        path = root / f"train-{i:06d}.tar"
        path.write_bytes(encode_tar(samples))
        paths.append(str(path))
    return paths


def npp_reader(paths: list[str], per_shard: int) -> int:
    stream = CodeStream(paths, [per_shard] * len(paths), batch_size=BATCH, num_workers=0, shuffle_buffer=5000)
    n = 0
    for batch in stream.iter_worker(0, 1):
        n += len(batch["labels"])
        if n >= len(paths) * per_shard - BATCH:
            break
    return n


def npp_global_reader(paths: list[str], per_shard: int, workers: int = 1, indexed: bool = False) -> tuple[int, float]:
    """What loader process 0 of `workers` builds in one data epoch: in a new stream (its shard indexes built on
    the way, as in a run's first epoch), or with every index built before the clock starts (later epochs)."""
    stream = GlobalStream(paths, [per_shard] * len(paths), batch_size=BATCH, shuffle_buffer=5000,
                          num_workers=workers)
    if indexed:
        stream.index_all()
    start = time.perf_counter()
    n = 0
    for batch in stream.iter_worker(0, workers):
        n += len(batch["labels"])
        if n >= (len(paths) * per_shard - BATCH) // workers:
            break
    return n, time.perf_counter() - start


def wds_reader(paths: list[str], rng: np.random.Generator) -> int:
    import webdataset as wds

    n, views, labels = 0, [], []
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode():
        codes = sample["codes.npy"]
        views.append(codes[rng.integers(len(codes))])
        labels.append(int(sample["cls"]))
        if len(labels) == BATCH:
            batch = {"codes": np.stack(views).reshape(BATCH, -1), "labels": np.asarray(labels, dtype=np.int64)}
            n += len(batch["labels"])
            views, labels = [], []
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.shards, args.per_shard, args.views)
        rng = np.random.default_rng(1)
        npp_reader(paths, args.per_shard), wds_reader(paths, rng)  # warm the page cache and imports
        readers = {
            "npp order 1": lambda: npp_reader(paths, args.per_shard),
            "npp order 2": lambda: npp_global_reader(paths, args.per_shard),
            "npp order 2, 1 of 8": lambda: npp_global_reader(paths, args.per_shard, workers=8),
            "npp order 2, 1 of 8, indexed": lambda: npp_global_reader(paths, args.per_shard, 8, indexed=True),
            "webdataset.WebDataset": lambda: wds_reader(paths, rng),
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, read in readers.items():
                start = time.perf_counter()
                n = read()
                n, seconds = n if isinstance(n, tuple) else (n, time.perf_counter() - start)
                rates[name].append(n / seconds)
    print(f"{args.shards} shards x {args.per_shard} samples, {args.views} views of 16x16 codes each; one process")
    for name, values in rates.items():
        print(f"  {name:<30} {statistics.median(values):10.0f} samples/s per worker "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
    median = {name: statistics.median(v) for name, v in rates.items()}
    print(f"  ratio npp order 1 / webdataset: {median['npp order 1'] / median['webdataset.WebDataset']:.2f}")
    for name in ("npp order 2", "npp order 2, 1 of 8", "npp order 2, 1 of 8, indexed"):
        print(f"  ratio {name} / npp order 1: {median[name] / median['npp order 1']:.2f}")


if __name__ == "__main__":
    main()
