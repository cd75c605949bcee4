"""Each rank computes on its own GPU: the device choice, checked with a patched CUDA on a CPU machine."""

import os
import re

import deepspeed  # imported before any test patches CUDA: DeepSpeed picks its accelerator (CPU here) once, at import
import pytest
import torch

from npp.runtime import devices


@pytest.fixture
def fake_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d) if not isinstance(d, int)
                                                                         else torch.device("cuda", d)))
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    return chosen


@pytest.mark.parametrize("local_rank,expected", [(0, 0), (3, 3), (11, 3)])
def test_torchrun_ranks_get_their_own_gpu(fake_gpus, monkeypatch, local_rank, expected):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert devices.pick_device("auto") == torch.device("cuda", expected)
    assert devices.pick_device("cuda") == torch.device("cuda", expected)  # plain "cuda" = this rank's GPU
    assert fake_gpus[-1] == torch.device("cuda", expected)  # and it is the current device


def test_srun_binding_one_gpu_per_task(fake_gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: one visible GPU
    assert devices.pick_device("auto") == torch.device("cuda", 0)


def test_explicit_devices_are_kept(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert devices.pick_device("cuda:6") == torch.device("cuda", 6)
    assert devices.pick_device("cpu") == torch.device("cpu")


@pytest.fixture
def rank3_on_cpu(fake_gpus, monkeypatch):
    """LOCAL_RANK=3 of 8 fake GPUs: every stage's call to pick_device is recorded with the device it would get, and
    the stage then computes on the CPU (this machine has no GPU)."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    asked = []

    def spy(device="auto"):
        asked.append(devices.pick_device(device))
        return torch.device("cpu")

    def patch(module):
        monkeypatch.setattr(module, "pick_device", spy)

    return asked, patch


def test_tokenize_encodes_on_this_ranks_gpu(rank3_on_cpu, tmp_path):
    from npp.pipeline.toy import write_toy_dataset
    from npp.tokenize import run
    from tests.helpers import save_small_vq

    asked, patch = rank3_on_cpu
    patch(run)
    write_toy_dataset(str(tmp_path / "images"), per_class=1, size=32)
    save_small_vq(tmp_path / "vq.pt")
    run.tokenize(run.TokenizeConfig(data=str(tmp_path / "images"), vq=str(tmp_path / "vq.pt"), out=str(tmp_path / "s"),
                                    image_size=32, samples_per_shard=10, batch=8, workers=0))
    assert asked == [torch.device("cuda", 3)]


def test_sampling_and_features_run_on_this_ranks_gpu(rank3_on_cpu, tmp_path):
    import numpy as np

    from npp.eval import features, sample
    from npp.models.toynet import ToyNet, ToyNetConfig
    from tests.helpers import make_gpt, save_small_vq

    asked, patch = rank3_on_cpu
    patch(sample)
    patch(features)
    save_small_vq(tmp_path / "vq.pt")
    gpt = make_gpt(vocab=64, num_classes=2)
    torch.save({"model": gpt.state_dict(), "config": gpt.config.to_dict(), "steps": 1}, tmp_path / "gpt.pt")
    sample.sample(
        sample.SampleConfig(
            ckpt=str(tmp_path / "gpt.pt"),
            vq=str(tmp_path / "vq.pt"),
            out=str(tmp_path / "o"),
            per_class=1,
            batch=2,
            cfg_scale="1.0",
        )
    )
    features.extract(ToyNet(ToyNetConfig(num_classes=2)), np.zeros((2, 32, 32, 3), np.uint8), progress=False)
    assert asked == [torch.device("cuda", 3)] * 2


def test_training_ranks_take_their_gpu(rank3_on_cpu, monkeypatch):
    """distributed.init: the device first (set as current before NCCL starts), then the process group."""
    from deepspeed.accelerator import real_accelerator

    from npp.train import distributed

    asked, patch = rank3_on_cpu
    patch(distributed)
    started = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append((list(asked), kw["dist_backend"])))
    assert distributed.init(distributed.DistEnv(3, 8, 3)) == torch.device("cpu")
    assert started == [([torch.device("cuda", 3)], "nccl")]
    assert real_accelerator.ds_accelerator.device_name() == "cpu"  # later tests still get DeepSpeed's CPU accelerator


def test_srun_with_one_gpu_per_task_binds_the_process_group_to_the_gpu_npp_uses(fake_gpus, monkeypatch):
    """srun --gpus-per-task=1: SLURM_LOCALID=3 but one visible GPU. DeepSpeed binds init_process_group to
    cuda:LOCAL_RANK, so LOCAL_RANK must name the device npp picked (cuda:0), not 3 (out of range on a GPU)."""
    from npp.train import distributed

    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):  # read_env writes them: undone after the test
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env = distributed.read_env()
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, 3)
    bound = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: bound.append(int(os.environ["LOCAL_RANK"])))
    monkeypatch.setattr(distributed, "pick_device", lambda d="auto": devices.pick_device(d))
    assert distributed.init(env) == torch.device("cuda", 0)
    assert bound == [0] and fake_gpus[-1] == torch.device("cuda", 0)


@pytest.mark.parametrize("version, ok", [("2.6.0+cu124", False), ("2.7.0", True), ("2.13.0", True),
                                         ("2.10.0a0+git1234", True), ("1.13.1", False)])
def test_a_torch_older_than_the_minimum_is_refused_in_one_line(version, ok):
    from npp.errors import ConfigError
    from npp.runtime.devices import check_torch

    if ok:
        check_torch(version)
    else:
        with pytest.raises(ConfigError, match=f"torch {re.escape(version)} is older than 2.7.*SYSTEM_SITE=1"):
            check_torch(version)
