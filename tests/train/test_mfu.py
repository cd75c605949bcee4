import pytest
import torch

from npp.train.mfu import peak_flops, peak_for_name


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA RTX A6000", 155e12), ("Tesla T4", None),
])
def test_peaks_per_exact_device_name(name, peak):
    assert peak_for_name(name) == peak


def test_override_and_cpu(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("NPP_PEAK_FLOPS", "1e15")
    assert peak_flops(torch.device("cpu")) == 1e15
