"""The TensorFlow Inception-v3 ("2015-12-05") that FID, sFID, IS and precision/recall use.

Layer names and shapes are torchvision's Inception3 names, which is how the
standard PyTorch port of the TF graph, `pt_inception-2015-12-05-6726825d.pth`,
stores them; the blocks carry the TF graph's differences (average pools that
ignore padding, a max pool in the last block, 1008 classes). The input path is
the graph's own: float pixels in [0, 255], bilinear resize to 299×299 with TF1's
legacy sampling (no half-pixel centres), then (x − 128) / 128.

Outputs: `pool` (2048, FID and precision/recall), `logits` (1008, pool @ W without
the bias, as the ADM evaluator builds its softmax), `spatial` (the first 7
channels of mixed_6/conv = Mixed_6d.branch1x1, 7×17×17, for sFID).
Weights are never downloaded at run time: `make assets` fetches the file once (`--inception PATH` or
NPP_INCEPTION_WEIGHTS).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (
    f"FID needs the TF Inception weights ported to PyTorch, {WEIGHTS_FILE} (the file pytorch-fid downloads from "
    "its GitHub releases). `make assets` downloads it into ckpts/; pass --inception PATH or set "
    "NPP_INCEPTION_WEIGHTS=PATH."
)


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool does not count the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        self.last_branch1x1 = b1  # mixed_N/conv in the TF graph: sFID reads it from Mixed_6d
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the graph's last block max-pools where the paper average-pools
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def tf_legacy_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) interpolation matrix of TF1 resize_bilinear(align_corners=False): src = dst·n_in/n_out."""
    scale = n_in / n_out
    src = torch.arange(n_out, dtype=torch.float64) * scale
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m.float()


class FIDInception(nn.Module):
    name = "inception"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self._resize: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → the graph's input (N, 3, 299, 299)."""
        x = images.permute(0, 3, 1, 2).float()
        h, w = x.shape[2:]
        if (h, w) != (299, 299):
            key = (h, w, str(x.device))
            if key not in self._resize:
                self._resize[key] = (
                    tf_legacy_resize_matrix(h, 299).to(x.device),
                    tf_legacy_resize_matrix(w, 299).to(x.device),
                )
            mh, mw = self._resize[key]
            x = torch.einsum("oh,nchw,pw->ncop", mh, x, mw)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
        ):
            x = block(x)
        spatial = self.Mixed_6d.last_branch1x1[:, :7]
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return {
            "pool": pool,
            "logits": pool @ self.fc.weight.t(),
            # NHWC flattening, as the graph's tensor is laid out
            "spatial": spatial.permute(0, 2, 3, 1).flatten(1),
        }


def load_inception(path: str | None = None) -> FIDInception:
    """The FID Inception with the standard weights, read weights-only; a clear error if the file is missing."""
    from .checkpoint import CheckpointMismatchError, extract_state_dict, load_state_strict, read_checkpoint

    if not path:  # the caller passes --inception or NPP_INCEPTION_WEIGHTS
        raise FileNotFoundError(WEIGHTS_HELP)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} do not exist. {WEIGHTS_HELP}")
    state = extract_state_dict(read_checkpoint(path))
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    net = FIDInception()
    for name, value in net.state_dict().items():  # older ports do not store BatchNorm's step counter
        if name.endswith("num_batches_tracked"):
            state.setdefault(name, value)
    try:
        load_state_strict(net, state, source=path)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{e}\n{WEIGHTS_HELP}") from None
    return net.eval()
