"""Feature networks for the metrics: the FID Inception, or the toy classifier where Inception means nothing.

Every metric name says which network made it: `fid` for Inception, `fid_toynet`
for the toy classifier, and so on.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from npp.runtime.devices import exact_fp32, pick_device
from npp.runtime.environment import inception_weights
from npp.runtime.files import file_sha256


def load_feature_net(inception: str | None = None, classifier: str | None = None):
    """The toy classifier when `classifier` is given, else the FID Inception (weights from the path or env)."""
    if classifier:
        from npp.models.toynet import load_toynet

        net, path = load_toynet(classifier), classifier
    else:
        from npp.models.inception import load_inception

        path = inception or inception_weights()
        net = load_inception(path)
    net.weights_sha256 = file_sha256(path)
    return net


def metric_suffix(net) -> str:
    return "" if net.name == "inception" else f"_{net.name}"


@torch.no_grad()
def extract(net, images: np.ndarray, batch: int = 100, device: torch.device | None = None, desc: str = "features",
            progress: bool = True) -> dict:
    """uint8 (N, H, W, 3) → {"pool", "logits", "spatial"} float64 arrays."""
    device = device or pick_device("auto")
    net = net.to(device).eval()
    out: dict[str, list] = {"pool": [], "logits": [], "spatial": []}
    with exact_fp32(device):  # FID must not depend on the GPU: no TF32 in the feature network
        for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", disable=not progress):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)
            for k, v in net(x).items():
                out[k].append(v.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
