"""Eval costs on this machine: images/s through the FID Inception, and one 2048-d Fréchet distance.

The Inception runs with random weights (the speed does not depend on them) on
256×256 uint8 images, resized to 299 inside the net as the TF graph does. The
Fréchet distance is timed on the covariance of 10,000 random 2048-d features
(target: under 5 s on 2 cores).

    .venv/bin/python bench/eval_throughput.py [--images 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from npp.eval.metrics import frechet_distance, gaussian_stats
from npp.models.inception import FIDInception


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = FIDInception().eval().to(device)
    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), dtype=torch.uint8, device=device)
    with torch.no_grad():
        net(images[: args.batch])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, args.images, args.batch):
            net(images[i : i + args.batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
    rate = args.images / (time.perf_counter() - start)

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10000, 2048)), rng.normal(size=(10000, 2048)) * 1.1 + 0.05
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    start = time.perf_counter()
    fd = frechet_distance(m1, s1, m2, s2)
    fd_time = time.perf_counter() - start
    print(f"Inception ({device.type}, {torch.get_num_threads()} threads, {args.size}px -> 299, batch {args.batch}): "
          f"{rate:.1f} images/s")
    print(f"Frechet distance, 2048-d float64: {fd_time:.2f} s (value {fd:.3f})")


if __name__ == "__main__":
    main()
