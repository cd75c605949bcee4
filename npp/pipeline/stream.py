"""Data order 1: the streams of runs begun before the layout-independent order
(npp.pipeline.global_order, "data order 2", which new runs take); kept so that such a run
resumes with the order it began with. Also the loader and device transfer both orders use.

Shards are read by npp.pipeline.tar_reader (≥ 100k samples/s per worker; webdataset's
decoder ~2,500).

Determinism and resume: the stream of each (rank, worker) is a pure function of
(seed, rank, world size, worker count) — shard order per data epoch from
(seed, epoch), a shuffle buffer and view choice from (seed, epoch, rank, worker).
The DataLoader takes batches from workers round-robin, so after B consumed
batches worker w has produced B // W (+1 if w < B % W) of them; a restarted run
rotates the roles (its first process continues stream B % W), replays exactly that
many batches per stream and continues, so no sample is repeated or skipped.
Whole data epochs are skipped by arithmetic on the manifest counts, only the
current epoch is replayed.

Shards are assigned per data epoch: a seeded permutation, then every
world_size-th shard to a rank and every W-th of those to a worker, as
webdataset's `split_by_node` / `split_by_worker` do.

Mixing: a worker reads `mix_shards` of its shards at once (memory-mapped, so open
shards cost page cache, not worker memory) and takes their samples in a random
order, before the shuffle buffer. Shards written by `npp tokenize` are already
class-mixed; this keeps batches mixed for shard sets made elsewhere from class-sorted
lists, where one shard holds one or two classes (see bench/class_mixing.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from npp.errors import ConfigError
from npp.pipeline.tar_reader import CorruptShardError, map_shard, parse_shard
from npp.runtime.workers import WorkerInit

__all__ = ["CodeStream", "CorruptShardError", "assign_shards", "batch_to_device", "make_loader", "map_shard",
           "next_untouched_epoch", "parse_shard", "shard_paths"]

def assign_shards(
    num_shards: int, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int
) -> list[int]:
    perm = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return perm[rank::world][worker::workers].tolist()


class CodeStream(IterableDataset):
    """Endless batches {"codes": uint16 (B, h·w), "labels": int64 (B,), "corrupt": int, "skipped": [str]} for one
    rank. A corrupt shard is reported with the first batch made after it was met ("skipped": "path (reason)"),
    never printed from the loader worker: a worker builds batches ahead that training may never take, so only
    the consumer of a batch can say, and count, what training actually skipped."""

    def __init__(
        self,
        shards: list[str],
        shard_samples: list[int],
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 5000,
        start_batches: int = 0,
        num_workers: int = 0,
        mix_shards: int = 16,
        start_epoch: int = 0,
    ):
        if len(shards) != len(shard_samples):
            raise ValueError("shards and shard_samples differ in length")
        need = world * max(1, num_workers)
        if len(shards) < need:
            raise ConfigError(
                f"{len(shards)} shards cannot feed {world} ranks x {max(1, num_workers)} loader workers "
                f"(a rank or worker without shards hangs the job): lower --workers or re-tokenize with "
                f"a smaller --samples-per-shard so there are at least {need} shards"
            )
        self.shards, self.shard_samples = list(shards), list(shard_samples)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.shuffle_buffer, self.start_batches, self.num_workers = max(1, shuffle_buffer), start_batches, num_workers
        self.mix_shards = max(1, int(mix_shards))
        self.start_epoch = int(start_epoch)  # start_batches count from the start of this data epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 1
        if info.num_workers != max(1, self.num_workers):
            raise RuntimeError("CodeStream was built for a different number of DataLoader workers")
        return info.id, info.num_workers

    def samples_of(self, epoch: int, worker: int, workers: int) -> int:
        idx = assign_shards(len(self.shards), epoch, self.seed, self.rank, self.world, worker, workers)
        return sum(self.shard_samples[i] for i in idx)

    def _open(self, i: int, stats: dict) -> list | None:
        try:
            return parse_shard(map_shard(self.shards[i]))
        except (OSError, CorruptShardError, ValueError, UnicodeDecodeError) as e:
            stats["corrupt"] += 1
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            stats["skipped"].append(f"{self.shards[i]} ({reason})")
            return None

    def _epoch_samples(self, epoch: int, worker: int, workers: int, stats: dict) -> Iterator[tuple[np.ndarray, int]]:
        """One data epoch of (codes, label): blocks of `mix_shards` shards, each block's samples in a
        random order, then a shuffle buffer that empties at the epoch's end."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        buf: list[tuple[np.ndarray, int]] = []
        order = assign_shards(len(self.shards), epoch, self.seed, self.rank, self.world, worker, workers)
        for start in range(0, len(order), self.mix_shards):
            block = [p for p in (self._open(i, stats) for i in order[start : start + self.mix_shards]) if p]
            if not block:
                continue
            # a random order of every sample of the block: shards interleaved, and each in random order
            index = [(w, k) for w, b in enumerate(block) for k in range(len(b))]
            for n in rng.permutation(len(index)).tolist():
                w, k = index[n]
                _, codes, label = block[w][k]
                item = (codes, label)
                if len(buf) < self.shuffle_buffer:
                    buf.append(item)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], item = item, buf[j]
                yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        physical, workers = self._worker()
        return self.iter_worker(physical, workers)

    def iter_worker(self, physical: int, workers: int) -> Iterator[dict]:
        """The batches the DataLoader process `physical` of `workers` yields (callable in-process)."""
        # The DataLoader always starts its round-robin at worker 0, so after B batches the
        # process that will be asked first must play the stream of worker B % W.
        worker = (physical + self.start_batches) % workers
        skip_batches = self.start_batches // workers + (1 if worker < self.start_batches % workers else 0)
        skip = skip_batches * self.batch_size
        epoch = self.start_epoch
        while skip > 0:  # whole data epochs are skipped by counting, not reading
            n = self.samples_of(epoch, worker, workers)
            if n == 0 or skip < n:
                break
            skip -= n
            epoch += 1
        stats = {"corrupt": 0, "skipped": []}
        reported = 0
        codes_batch: list[np.ndarray] = []
        labels: list[int] = []
        while True:
            view_rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 2])
            produced = False
            for codes, label in self._epoch_samples(epoch, worker, workers, stats):
                produced = True
                v = int(view_rng.integers(codes.shape[0])) if codes.ndim == 3 else 0
                if skip > 0:
                    skip -= 1
                    continue
                codes_batch.append(codes[v] if codes.ndim == 3 else codes)
                labels.append(label)
                if len(labels) == self.batch_size:
                    # numpy, not tensors: small batches cross the worker pipe pickled ~5x faster
                    # than through torch's shared-memory handles; `batch_to_device` converts.
                    batch = {
                        "codes": np.stack(codes_batch).reshape(self.batch_size, -1),
                        "labels": np.asarray(labels, dtype=np.int64),
                        "corrupt": stats["corrupt"] - reported,
                        "skipped": stats["skipped"],
                    }
                    reported, stats["skipped"] = stats["corrupt"], []
                    codes_batch, labels = [], []
                    yield batch
            if not produced and stats["corrupt"] >= len(self.shards):
                raise CorruptShardError("every shard of this worker is unreadable")
            epoch += 1


def next_untouched_epoch(shards: list[str], shard_samples: list[int], batch_size: int, world: int, workers: int,
                         seed: int, start_epoch: int, batches: int) -> int:
    """The first data epoch that no stream of a (world, workers, batch) layout has begun after `batches`
    micro-batches per rank counted from `start_epoch`.

    A run resumed with another layout (world size, loader workers, micro-batch) cannot
    replay the old streams' positions, so it continues from this epoch: no sample of
    the interrupted epoch is seen twice, and the part of it no stream reached is skipped.
    """
    w_count = max(1, workers)
    best = start_epoch
    for rank in range(world):
        stream = CodeStream(shards, shard_samples, batch_size, rank=rank, world=world, seed=seed, num_workers=workers)
        for w in range(w_count):
            left = (batches // w_count + (1 if w < batches % w_count else 0)) * batch_size
            epoch = start_epoch
            while left > 0:
                n = stream.samples_of(epoch, w, w_count)
                if n == 0 or left < n:
                    break
                left -= n
                epoch += 1
            best = max(best, epoch + (1 if left > 0 else 0))
    return best


def _keep(batch: dict) -> dict:
    return batch


def make_loader(stream: IterableDataset, workers: int, prefetch: int = 4) -> DataLoader:
    """The DataLoader for a CodeStream or GlobalStream: batches pass through as built (no collation, no tensor IPC).

    Workers ignore the stop signals and die with their rank (npp.runtime.workers): a
    SIGTERM sent to every process of the job must reach the rank's save, not kill the
    DataLoader under it.
    """
    return DataLoader(
        stream, batch_size=None, num_workers=workers, collate_fn=_keep,
        persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None,
        worker_init_fn=WorkerInit(ignore_stop_signals=True) if workers else None,
    )


def batch_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 (B, h·w), labels int64 (B,)) on the device."""
    codes = torch.from_numpy(batch["codes"].astype(np.int64))
    labels = torch.from_numpy(batch["labels"])
    if device.type == "cuda":
        codes, labels = codes.pin_memory(), labels.pin_memory()
    return codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def shard_paths(shard_dir: str, manifest: list[dict]) -> tuple[list[str], list[int]]:
    """Paths and sample counts of a manifest's shards (rows with `path` come from several sets)."""
    return [m.get("path") or os.path.join(shard_dir, m["file"]) for m in manifest], [
        int(m["samples"]) for m in manifest
    ]
