"""The trainer's resumable state, saved and restored as one object with every checkpoint.

Everything that must continue exactly after a restart and is not DeepSpeed's (weights,
optimizer, LR schedule) or the EMA's: the optimizer step, the micro-batches consumed
(the data position), where the data streams were started (`data_base`) and in which
layout (`data_layout`: world size, loader workers, micro-batch), cumulative training
FLOPs, the counters, the MLflow run, and this rank's RNG states. The numbers travel in
DeepSpeed's client state (and `client.json`); the RNG goes to the rank's own file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# lets deepspeed.checkpoint.ds_to_universal convert our checkpoints (npp train convert)
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps applied
    micro_batches: int = 0  # micro-batches taken from this rank's stream since the run began
    train_flops: float = 0.0  # spent, applied or not
    train_hours: float = 0.0  # in training steps, up to this step (npp.train.progress.Progress.train_hours)
    bad_steps: int = 0  # steps skipped for non-finite gradients, in all
    corrupt_shards: int = 0  # over all ranks and restarts
    mlflow_run_id: str | None = None
    world_size: int = 1
    data_layout: dict | None = None  # {"world_size", "workers", "micro_batch"} the streams were cut for
    data_base: dict = field(default_factory=lambda: {"epoch": 0, "micro_batches": 0})  # where the streams began
    rng: dict | None = field(default=None, repr=False)  # this rank's generators (its own file, not client state)

    def client_state(self) -> dict:
        """What DeepSpeed stores beside the weights (plain values; the RNG goes to the rank's file)."""
        state = dataclasses.asdict(self)
        state.pop("rng")
        return {**state, **UNIVERSAL_INFO}

    @classmethod
    def from_client_state(cls, client: dict | None, rng: dict | None = None) -> TrainState:
        """From a checkpoint's client state (older checkpoints lack some fields: their defaults hold)."""
        if not client:
            return cls(rng=rng)
        names = {f.name for f in dataclasses.fields(cls)} - {"rng"}
        state = cls(**{k: v for k, v in client.items() if k in names and v is not None}, rng=rng)
        if state.data_layout is None and client.get("world_size"):  # before data_layout was saved
            state.data_layout = {"world_size": client["world_size"]}
        return state
