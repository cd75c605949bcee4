"""Dense bf16 peak FLOP/s per GPU, for MFU (model FLOPs utilisation).

Matched against `torch.cuda.get_device_name`, most specific first: an H100 PCIe has
76% of an SXM part's peak, an NVL 84%, so a substring match on "H100" alone would
misstate MFU. Set NPP_PEAK_FLOPS for any other device (or to override).
Figures: NVIDIA's datasheets, dense (no 2:4 sparsity) bf16 with fp32 accumulate.
"""

from __future__ import annotations

import torch

from npp.runtime import environment

PEAK_BF16: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB alike
    ("L40S", 362e12),
    ("A6000", 155e12),  # RTX A6000
]


def peak_for_name(name: str) -> float | None:
    upper = name.upper()
    return next((peak for key, peak in PEAK_BF16 if key.upper() in upper), None)


def peak_flops(device: torch.device) -> float | None:
    given = environment.peak_flops()
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))
