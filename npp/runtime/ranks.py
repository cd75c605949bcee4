"""Which process this is among a job's, read from the environment one way for every stage (torch-free).

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK; srun (one task per
GPU) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. A plain command is rank 0 of 1.
SLURM array tasks are another thing (independent jobs, not ranks): tokenize reads those itself.
"""

from __future__ import annotations

import os
import socket


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun, srun with several tasks, or alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def local_rank() -> int:
    """This process's index on its node (which GPU it takes)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_rank_zero() -> bool:
    return rank_and_world()[0] == 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous of a world of one, or of a local torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
