"""The distributed environment in one place: torchrun, the deepspeed launcher, srun, or one process.

torchrun and `deepspeed` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT;
under `srun` (one task per GPU) we map SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
take the master from MASTER_ADDR (set by slurm/train.sbatch from the node list). A
plain `npp train` runs as a world of one on a free local port.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from npp.runtime.devices import pick_device
from npp.runtime.ranks import free_port, local_rank, rank_and_world
from npp.train.errors import TrainingError


class DistributedSetupError(TrainingError):
    """The process group cannot be formed from this environment."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """This rank (npp.runtime.ranks), with the variables torch.distributed needs set: srun's are mapped to
    torchrun's names, a world of one gets a free local port."""
    env = os.environ
    rank, world = rank_and_world()
    local = local_rank()
    if "RANK" not in env and world > 1:  # srun: one task per GPU, the master from slurm/train.sbatch
        if "MASTER_ADDR" not in env:
            raise DistributedSetupError("running under srun without MASTER_ADDR: use slurm/train.sbatch, which sets it")
        env.setdefault("MASTER_PORT", "29500")
    elif world == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return DistEnv(rank, world, local)


def skip_jit_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU; gloo serves.

    torch builds JIT ops under a lock file in ~/.cache/torch_extensions; a start killed
    while holding it (preemption during `deepspeed.initialize`) leaves the lock behind and
    every later start by that user, on every node sharing the home directory, waits on
    it forever. The op only speeds up CPU all-reduce, which this pipeline uses for tests
    and the demo, so it is not built at all.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def stale_extension_locks(names: list[str], max_age_s: float = 600.0) -> list[str]:
    """Lock files of JIT op builds older than max_age_s (a build takes a minute or two): left by a killed start."""
    import glob
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    now = time.time()
    # TORCH_EXTENSIONS_DIR/<name>/lock, or <default root>/py311_cpu/<name>/lock
    found = [
        p
        for name in names
        for pattern in (os.path.join(root, name, "lock"), os.path.join(root, "*", name, "lock"))
        for p in glob.glob(pattern)
    ]
    return [lock for lock in found if now - os.path.getmtime(lock) > max_age_s]


def init(env: DistEnv, timeout_s: float = 1800.0) -> torch.device:
    """Start the process group (NCCL on CUDA, gloo on CPU) and return this rank's device. `timeout_s`: how long a
    collective may wait for a peer (--collective-timeout): NCCL's watchdog and gloo end the wait then."""
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda:
        skip_jit_shm_op()
    device = pick_device("auto")  # cuda:(local_rank % visible GPUs), set as current
    if device.type == "cuda":
        # DeepSpeed binds the process group to cuda:LOCAL_RANK (init_process_group(device_id=...)); under srun with
        # one GPU bound per task SLURM_LOCALID (say 3) is not a visible device: bind the one npp uses
        os.environ["LOCAL_RANK"] = str(device.index)
    # Generous by default: start-up, data loading and a large checkpoint's save or load can be slow on a cluster.
    # A little longer than npp's watchdog (npp.train.watchdog), which then names the stalled rank before NCCL's own
    # watchdog aborts the process without a word.
    wait = timeout_s + max(60.0, 0.1 * timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=wait))
    if env.local_rank == 0 and env.world_size > 1:  # one line per node: where the ranks run
        import socket

        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        print(f"[npp train] node {socket.gethostname()}: ranks {env.rank}-{env.rank + per_node - 1} of "
              f"{env.world_size} on {device}", flush=True)
    return device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (one collective for several numbers)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
