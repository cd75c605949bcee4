"""How much a FID moves while the model does not: other sampling seeds, and the VQ decode in bf16.

A difference between two runs' FIDs means something only beside the noise of the measurement itself. This
samples one model N times per class with each of --seeds (fp32, the sampler's seeds: `npp sample --seed`) and
scores each set against the reference with the same feature network: the spread is the sampling noise of a FID of
that many samples. Then the first seed's codes are decoded again under bf16 autocast, as `npp sample --precision
bf16` (the CUDA default) decodes them, about half the decode's time on a GPU: its change beside that noise. On a
CPU, so the numbers do not depend on the machine's speed, only on its arithmetic.

    .venv/bin/python bench/fid_noise.py --ckpt demo_out/runs/npp/model.pt --vq demo_out/vq_toy.pt \\
        --ref demo_out/ref_toynet.npz --classifier demo_out/toynet.pt --per-class 100 --seeds 0,1,2
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
    ap.add_argument("--seeds", default="0,1,2", help="sampling seeds (npp sample --seed)")
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

    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed, first = {}, None
    for seed in seeds:
        codes = codes_of(seed)
        per_seed[seed], images = scored(codes, False)
        if first is None:
            first = (codes, images)
    bf16, b = scored(first[0], True)
    a = first[1]
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    print(f"{len(labels)} samples of {args.ckpt} per seed, cfg {args.cfg_scale:g}, temperature {args.temperature:g}")
    print(f"{'metric':<24} " + " ".join(f"{'seed ' + str(s):>10}" for s in seeds)
          + f" {'min-max':>10} {'bf16 decode':>12} {'- fp32':>9}")
    for k in per_seed[seeds[0]]:
        values = [per_seed[s][k] for s in seeds]
        print(f"{k:<24} " + " ".join(f"{v:10.4f}" for v in values)
              + f" {max(values) - min(values):10.4f} {bf16[k]:12.4f} {bf16[k] - values[0]:+9.4f}")
    print(f"pixels the bf16 decode changed (seed {seeds[0]}): {(diff > 0).mean():.1%}, mean |diff| "
          f"{diff.mean():.3f}, max {diff.max()}")


if __name__ == "__main__":
    main()
