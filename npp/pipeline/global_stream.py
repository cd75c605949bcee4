"""The loader side of data order 2 (npp.pipeline.global_order): one rank's micro-batches, built by
whichever loader process the DataLoader asks, each sample read where the global order puts it.

Corrupt shards: their samples are unreadable; a micro-batch replaces each unreadable
sample by one of its readable ones (the batch keeps its size and its positions, so the
other batches and ranks are unaffected), and each unreadable shard is reported once per
data epoch, by the micro-batch that holds its first position. A micro-batch with no
readable sample stops training with the shards' names.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from npp.pipeline.global_order import epoch_order
from npp.pipeline.tar_reader import CorruptShardError, ShardIndex, index_shard, map_shard

# Shards a loader worker keeps mapped at once: a map holds a file descriptor, and a worker reads from every shard of
# the block in use (ImageNet has 1,282 shards; a process may have 1,024 descriptors). An index outlives its map.
MAX_OPEN = 128
# errors of the machine, not of the shard: training stops (and is requeued) rather than skip a sound shard forever
TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.EIO}


class GlobalStream(IterableDataset):
    """Endless micro-batches of one rank in the layout-independent order, as dicts like CodeStream's:
    {"codes": uint16 (B, h·w), "labels": int64 (B,), "corrupt": int, "skipped": [str]}.

    `start_sample`: the run's position where this start begins (see the module docstring)."""

    def __init__(self, shards: list[str], shard_samples: list[int], batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle_buffer: int = 5000, mix_shards: int = 16,
                 start_sample: int = 0, num_workers: int = 0):
        if len(shards) != len(shard_samples):
            raise ValueError("shards and shard_samples differ in length")
        self.shards, self.counts = list(shards), [int(c) for c in shard_samples]
        self.total = sum(self.counts)
        if self.total < 1:
            raise CorruptShardError("the shard set holds no samples")
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.shuffle_buffer, self.mix_shards = max(1, shuffle_buffer), max(1, int(mix_shards))
        self.start_sample, self.num_workers = int(start_sample), num_workers
        self._index: dict[int, ShardIndex | str] = {}  # per process: a shard's index, or why it is unreadable
        self._maps: OrderedDict[int, memoryview] = OrderedDict()  # the MAX_OPEN shards mapped most recently
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._first: dict[tuple[int, int], int] = {}  # (epoch, unreadable shard): its first position there

    def batch_start(self, micro_batch: int) -> int:
        """The run position of this rank's micro-batch `micro_batch` (counted from this start)."""
        return self.start_sample + (micro_batch * self.world + self.rank) * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.iter_worker(physical, workers)

    def iter_worker(self, physical: int, workers: int) -> Iterator[dict]:
        """The batches the DataLoader process `physical` of `workers` yields: it always asks process 0 first,
        then round-robin, so process w builds micro-batches w, w + workers, ... (callable in-process)."""
        m = physical
        while True:
            yield self.batch_at(self.batch_start(m))
            m += max(1, workers)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._orders:
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
            self._orders[epoch] = epoch_order(self.counts, self.seed, epoch, self.shuffle_buffer, self.mix_shards)
        return self._orders[epoch]

    def index_all(self) -> None:
        """Index every shard now (a worker otherwise does it when a batch first needs the shard)."""
        for s in range(len(self.shards)):
            self._shard(s)

    def _shard(self, s: int) -> ShardIndex | str:
        if s not in self._index:
            path = self.shards[s]
            try:
                data = self._map(s)
                index = index_shard(data)
            except OSError as e:
                if e.errno in TRANSIENT:
                    raise
                index = f"{path} ({e.strerror or type(e).__name__})"
            except (CorruptShardError, ValueError, UnicodeDecodeError) as e:
                index = f"{path} ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
            else:
                index.data = None  # the index outlives the map (`_map` maps the shard again when needed)
                if len(index) < self.counts[s]:
                    index = (f"{path} (holds {len(index)} complete samples, its manifest says {self.counts[s]}: "
                             "re-tokenize it)")
            self._index[s] = index
        return self._index[s]

    def _map(self, s: int) -> memoryview:
        """Shard s's bytes, mapped; at most MAX_OPEN maps are kept (the least recently used is let go)."""
        if s in self._maps:
            self._maps.move_to_end(s)
            return self._maps[s]
        data = self._maps[s] = map_shard(self.shards[s])
        while len(self._maps) > MAX_OPEN:
            self._maps.popitem(last=False)  # closed once the last array viewing it is gone
        return data

    def _is_first(self, epoch: int, s: int, offset: int) -> bool:
        """Whether `offset` is shard s's first position in `epoch` (where an unreadable shard is reported)."""
        if (epoch, s) not in self._first:
            numbers, _ = self._order(epoch)
            self._first[(epoch, s)] = int(np.argmax((numbers >= self.offsets[s]) & (numbers < self.offsets[s + 1])))
        return self._first[(epoch, s)] == offset

    def batch_at(self, start: int) -> dict:
        """The micro-batch of run positions [start, start + batch_size)."""
        codes, labels, bad, skipped, reports = [], [], [], [], 0
        position = start
        while position < start + self.batch_size:
            epoch, offset = divmod(position, self.total)
            stop = min(self.total, offset + start + self.batch_size - position)
            numbers, views = self._order(epoch)
            shard_of = np.searchsorted(self.offsets, numbers[offset:stop], side="right") - 1
            for j, s in enumerate(shard_of.tolist()):
                index = self._shard(s)
                if isinstance(index, str):
                    bad.append(len(codes))
                    codes.append(None)
                    labels.append(-1)
                    if self._is_first(epoch, s, offset + j):
                        reports += 1  # once per data epoch, also when this batch spans two
                        if index not in skipped:  # named once per batch
                            skipped.append(index)
                    continue
                k = int(numbers[offset + j] - self.offsets[s])
                array = index.codes(k, self._map(s))
                if array.ndim == 3:
                    array = array[min(array.shape[0] - 1, int(views[offset + j] * array.shape[0]))]
                codes.append(array)
                labels.append(int(index.labels[k]))
            position += stop - offset
        if bad:
            good = [i for i in range(len(codes)) if codes[i] is not None]
            if not good:
                raise CorruptShardError(
                    f"every sample of the micro-batch at run position {start} is in an unreadable shard: "
                    f"{'; '.join(sorted({self._index[s] for s in self._index if isinstance(self._index[s], str)}))}"
                    " — re-tokenize these shards or remove them from the shard set")
            for n, i in enumerate(bad):
                codes[i], labels[i] = codes[good[n % len(good)]], labels[good[n % len(good)]]
        # numpy, not tensors: small batches cross the worker pipe pickled ~5x faster than through torch's
        # shared-memory handles; `batch_to_device` converts.
        return {"codes": np.stack(codes).reshape(self.batch_size, -1), "labels": np.asarray(labels, np.int64),
                "corrupt": reports, "skipped": skipped}
