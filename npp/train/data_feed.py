"""The trainer's data: where this start's streams begin, and the loader that serves them.

Data order 2 (npp.pipeline.global_order, every run begun since it exists): the order is one
sequence of the run, whatever the layout; a start continues at the sample position the
run reached (micro-batches × world size × micro-batch since the last start), on any
number of ranks, loader workers or micro-batch size: nothing skipped, nothing repeated.

Data order 1 (npp.pipeline.stream, runs begun before): the same layout as the checkpoint
(world size, loader workers, micro-batch) replays exactly from the micro-batch count;
another layout continues at the first data epoch no old stream had begun
(npp.pipeline.stream.next_untouched_epoch), so no sample is repeated.
"""

from __future__ import annotations

from collections.abc import Callable

from npp.pipeline.global_stream import GlobalStream
from npp.pipeline.stream import CodeStream, make_loader, next_untouched_epoch, shard_paths
from npp.train.state import TrainState


class DataFeed:
    def __init__(self, shards: str, manifest: list[dict], seed: int, shuffle_buffer: int, mix_shards: int,
                 micro_batch: int, rank: int, world_size: int, workers: int, order: int = 2):
        self.shards, self.manifest, self.seed = shards, manifest, seed
        self.shuffle_buffer, self.mix_shards = shuffle_buffer, mix_shards
        self.micro_batch, self.rank, self.world_size, self.workers = micro_batch, rank, world_size, workers
        self.order = order

    @classmethod
    def of(cls, plan, rank: int, world_size: int) -> DataFeed:
        """The streams of a training plan (its feed, npp.train.plan.FeedSettings, and the run's seed) for this rank."""
        feed = plan.feed
        return cls(feed.shards, list(feed.manifest), plan.seed, feed.shuffle_buffer, feed.mix_shards, feed.micro_batch,
                   rank, world_size, feed.workers, feed.order)

    def layout(self) -> dict:
        return {"world_size": self.world_size, "workers": max(1, self.workers), "micro_batch": self.micro_batch}

    def position(self, state: TrainState, resumed: bool, log: Callable[[str], None]) -> dict:
        """Where this start's data streams begin: {"epoch", "micro_batches"} (micro-batches counted from there),
        and for data order 2 "samples", the run's sample position."""
        base = dict(state.data_base)
        if not resumed:
            return base
        old = {**self.layout(), **(state.data_layout or {})}
        if self.order >= 2:
            samples = base.get("samples", 0) + (state.micro_batches - base["micro_batches"]) * (
                old["micro_batch"] * old["world_size"])
            total = sum(int(m["samples"]) for m in self.manifest)
            if old != self.layout():
                log(f"data layout changed ({old} -> {self.layout()}): the run's sample order does not depend on it; "
                    f"continuing at sample {samples} (data epoch {samples // total}), nothing skipped or repeated")
            return {"epoch": samples // total, "micro_batches": state.micro_batches, "samples": samples}
        if old == self.layout():
            return base
        paths, counts = shard_paths(self.shards, self.manifest)
        epoch = next_untouched_epoch(paths, counts, old["micro_batch"], old["world_size"], old["workers"],
                                     self.seed, base["epoch"], state.micro_batches - base["micro_batches"])
        seen = (state.micro_batches - base["micro_batches"]) * old["micro_batch"] * old["world_size"]
        log(f"data layout changed ({old} -> {self.layout()}): streams continue at data epoch {epoch} "
            f"({seen} samples consumed since epoch {base['epoch']}; none is repeated)")
        return {"epoch": epoch, "micro_batches": state.micro_batches}

    def loader(self, state: TrainState):
        paths, counts = shard_paths(self.shards, self.manifest)
        since_start = state.micro_batches - state.data_base["micro_batches"]
        if self.order >= 2:
            stream = GlobalStream(
                paths, counts, batch_size=self.micro_batch, rank=self.rank, world=self.world_size, seed=self.seed,
                shuffle_buffer=self.shuffle_buffer, mix_shards=self.mix_shards, num_workers=self.workers,
                start_sample=state.data_base.get("samples", 0) + since_start * self.micro_batch * self.world_size)
        else:
            stream = CodeStream(
                paths, counts, batch_size=self.micro_batch, rank=self.rank, world=self.world_size, seed=self.seed,
                shuffle_buffer=self.shuffle_buffer, start_batches=since_start, start_epoch=state.data_base["epoch"],
                num_workers=self.workers, mix_shards=self.mix_shards)
        return make_loader(stream, self.workers)
