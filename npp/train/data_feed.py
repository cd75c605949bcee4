"""The trainer's data: where this start's streams begin, and the loader that serves them.

Same layout as the checkpoint (world size, loader workers, micro-batch): the streams replay
exactly from the micro-batch count. Another layout: continue at the first data epoch no old
stream had begun (npp.pipeline.stream.next_untouched_epoch), so no sample is repeated.
"""

from __future__ import annotations

from collections.abc import Callable

from npp.pipeline.stream import CodeStream, make_loader, next_untouched_epoch, shard_paths
from npp.train.state import TrainState


class DataFeed:
    def __init__(self, shards: str, manifest: list[dict], seed: int, shuffle_buffer: int, mix_shards: int,
                 micro_batch: int, rank: int, world_size: int, workers: int):
        self.shards, self.manifest, self.seed = shards, manifest, seed
        self.shuffle_buffer, self.mix_shards = shuffle_buffer, mix_shards
        self.micro_batch, self.rank, self.world_size, self.workers = micro_batch, rank, world_size, workers

    @classmethod
    def of(cls, plan, rank: int, world_size: int) -> DataFeed:
        """The streams of a training plan (npp.train.plan.TrainPlan) for this rank."""
        c = plan.cfg
        return cls(c.shards, plan.manifest, c.seed, c.shuffle_buffer, c.mix_shards, plan.micro_batch, rank,
                   world_size, plan.workers)

    def layout(self) -> dict:
        return {"world_size": self.world_size, "workers": max(1, self.workers), "micro_batch": self.micro_batch}

    def position(self, state: TrainState, resumed: bool, log: Callable[[str], None]) -> dict:
        """Where this start's data streams begin: {"epoch", "micro_batches"} (micro-batches counted from there)."""
        base = dict(state.data_base)
        if not resumed:
            return base
        old = {**self.layout(), **(state.data_layout or {})}
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
        stream = CodeStream(
            paths, counts, batch_size=self.micro_batch, rank=self.rank, world=self.world_size, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, start_batches=state.micro_batches - state.data_base["micro_batches"],
            start_epoch=state.data_base["epoch"], num_workers=self.workers, mix_shards=self.mix_shards,
        )
        return make_loader(stream, self.workers)
