"""Does decoding in bf16 move the FID? The same generated codes decoded in fp32 and under bf16 autocast.

`npp sample --precision bf16` (the CUDA default) decodes under bf16 autocast, about half the decode's time on a
GPU. This measures what that does to the metrics on a real model: the codes of N samples are generated once (fp32,
the sampler's seeds), decoded both ways, and scored against the reference with the same feature network; beside
it, the same model sampled with another seed (the sampling noise a FID of N samples has anyway). On a CPU, so the
numbers do not depend on the machine's speed, only on its arithmetic.

    .venv/bin/python bench/decode_precision.py --ckpt demo_out/runs/npp/model.pt --vq demo_out/vq_toy.pt \\
        --ref demo_out/ref_toynet.npz --classifier demo_out/toynet.pt --per-class 100
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from npp.eval.evaluate import metrics_from_features
from npp.eval.features import extract, load_feature_net
from npp.eval.pieces import balanced_labels
from npp.eval.reference import reference_for
from npp.models.checkpoint import load_gpt, load_vq
from npp.models.generate import Sampler
from npp.pipeline.images import to_uint8_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("ckpt", "vq", "ref"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--classifier", default="")
    ap.add_argument("--inception", default="")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    model, _ = load_gpt(args.ckpt)
    vq, _ = load_vq(args.vq)
    model, vq = model.eval(), vq.eval()
    net = load_feature_net(args.inception or None, args.classifier or None)
    ref = reference_for(net, args.ref)
    labels = balanced_labels(model.config.num_classes, args.per_class)
    sampler = Sampler(model, args.batch, args.cfg_scale != 1.0, args.temperature, 0, compile=False)

    def codes_of(seed: int) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(labels), args.batch):
            ids = range(start, min(start + args.batch, len(labels)))
            lab = torch.from_numpy(labels[list(ids)])
            out.append(sampler.generate(lab, cfg_scale=args.cfg_scale, seed=seed, sample_ids=ids))
        return out

    def scored(codes: list[torch.Tensor], bf16: bool) -> tuple[dict, np.ndarray]:
        with torch.no_grad():
            images = np.concatenate([to_uint8_images(vq.decode_in_chunks(c, 16, bf16=bf16)) for c in codes])
        return metrics_from_features(net, extract(net, images, progress=False), ref, labels), images

    codes = codes_of(0)
    fp32, a = scored(codes, False)
    bf16, b = scored(codes, True)
    other, _ = scored(codes_of(1), False)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    print(f"{len(labels)} samples of {args.ckpt}, cfg {args.cfg_scale:g}, temperature {args.temperature:g}; "
          f"pixels changed by the bf16 decode: {(diff > 0).mean():.1%}, mean |diff| {diff.mean():.3f}, "
          f"max {diff.max()}")
    print(f"{'metric':<24} {'fp32 decode':>12} {'bf16 decode':>12} {'bf16 - fp32':>12} {'seed 1 - seed 0':>16}")
    for k in fp32:
        print(f"{k:<24} {fp32[k]:12.4f} {bf16[k]:12.4f} {bf16[k] - fp32[k]:+12.4f} {other[k] - fp32[k]:+16.4f}")


if __name__ == "__main__":
    main()
