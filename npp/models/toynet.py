"""A small CNN classifier standing in for Inception where Inception is meaningless (the toy set).

Same outputs as the FID Inception, so every metric is computed the same way:
`pool` (features for FID and precision/recall), `logits` (class scores for IS and
for the share of samples classified as their conditioning class), `spatial` (an
early feature map, for sFID).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from npp.errors import ConfigError


@dataclass
class ToyNetConfig:
    num_classes: int = 10
    image_size: int = 32
    width: int = 32
    feature_dim: int = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ToyNet(nn.Module):
    name = "toynet"

    def __init__(self, cfg: ToyNetConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.stem = _block(3, w)
        self.stage1 = nn.Sequential(_block(w, w), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_block(2 * w, 4 * w), _block(4 * w, 4 * w), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * w, cfg.feature_dim)
        self.fc = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float (N, 3, S, S) in [-1, 1] at the classifier's image size."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            x = F.interpolate(
                x, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            )
        return x

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stage1(self.stem(self.preprocess(images)))
        spatial = x
        x = self.stage3(self.stage2(x))
        pool = F.relu(self.head(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return {"pool": pool, "logits": self.fc(pool), "spatial": spatial[:, :7].flatten(1)}

    def checkpoint(self) -> dict:
        return {"model": self.state_dict(), "config": asdict(self.config), "kind": "toynet"}


def load_toynet(path: str) -> ToyNet:
    from .checkpoint import extract_state_dict, load_state_strict, read_checkpoint

    ckpt = read_checkpoint(path)
    if ckpt.get("kind") != "toynet":
        raise ConfigError(f"{path} is not a toy classifier checkpoint: make one with `npp eval fit-classifier`")
    net = ToyNet(ToyNetConfig(**ckpt["config"]))
    load_state_strict(net, extract_state_dict(ckpt), source=path)
    return net.eval()
