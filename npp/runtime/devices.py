"""Which device a process computes on: one GPU per local rank, or the CPU.

torchrun and srun start one process per GPU and say which through LOCAL_RANK (srun:
SLURM_LOCALID). Every stage that runs on a GPU (train, tokenize's encoder, sampling,
the eval feature network) asks here, so `make sample NGPU=8` puts rank r on GPU r
rather than all ranks on GPU 0. Where srun binds one GPU per task, each process sees
one device, hence `local_rank % device_count()`.
"""

from __future__ import annotations

import contextlib

import torch

from npp.runtime.ranks import local_rank

# The oldest torch npp runs with: 2.7 renamed torch._dynamo.config.cache_size_limit to recompile_limit, which the
# compiled blocks and the sampler's graph raise; a cluster's kept torch (make setup SYSTEM_SITE=1) may be older.
MIN_TORCH = (2, 7)


def torch_version(text: str) -> tuple[int, int]:
    """'2.6.0+cu124' -> (2, 6)."""
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_torch(version: str | None = None) -> None:
    """Refuse a torch older than MIN_TORCH with one line and the fix, before any work."""
    from npp.errors import ConfigError

    version = version or torch.__version__
    if torch_version(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ConfigError(f"torch {version} is older than {need}, the oldest npp runs with (torch._dynamo's "
                          f"recompile_limit): load a torch >= {need} (module load / conda), or `make setup` without "
                          "SYSTEM_SITE=1 for the pinned one")


def pick_device(device: str = "auto") -> torch.device:
    """"auto": this process's GPU (set as the current CUDA device) when CUDA is available, else the CPU. Every stage
    asks here first, so an unsupported torch is refused here (check_torch)."""
    check_torch()
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = local_rank() % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # plain "cuda" means this rank's GPU
            dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def fast_matmul(device: torch.device) -> None:
    """TF32 for matmul/conv where exact fp32 is not needed (tokenize's encoder, sampling)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """TF32 off inside the block (FID features must not depend on the GPU model), as it was after it."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
