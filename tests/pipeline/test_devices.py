"""Each rank computes on its own GPU: the device choice, checked with a patched CUDA on a CPU machine."""

import pytest
import torch

from npp.pipeline import devices


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


def test_every_gpu_stage_asks_for_this_ranks_device(fake_gpus, monkeypatch):
    """sample, eval features, tokenize and train all choose their device through pick_device."""
    import inspect

    from npp.eval import features, sample
    from npp.tokenize import run
    from npp.train import distributed

    for module in (sample, features, run, distributed):
        assert "pick_device(" in inspect.getsource(module), module.__name__
        assert '"cuda" if torch.cuda.is_available()' not in inspect.getsource(module), module.__name__
