"""Trainer samples/s per process for each patch side, and the data stream against what a GPU consumes.

One process, npp's own training step (`npp.train.step.standalone_step`: the DeepSpeed
ZeRO-2 engine, clipping, EMA, as `npp train` builds it; gloo and fp32 on CPU, NCCL and
bf16-mixed with compiled blocks on CUDA), a GPT on a 16×16 grid with a 16384 vocabulary.
The data stream is timed on real shard tars shaped like the ImageNet recipe's (20 views
per sample with --ten-crop), in-process and through 1 and 2 DataLoader workers, and set
against the samples/s an H200 consumes at GPT-B k=4, the hungriest stage: computed from
GPT-B's FLOPs per sample at k=4 and the H200's dense bf16 peak at --mfu (a computed
demand, not a GPU measurement; `make gpu-check` measures the step itself).

    .venv/bin/python bench/train_throughput.py [--model GPT-Mini] [--batch 32] [--steps 4] [--views 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from npp.models import gpt_config, train_flops_per_sample
from npp.pipeline.shards import Sample, encode_tar
from npp.pipeline.stream import CodeStream, make_loader
from npp.train.config import TrainConfig
from npp.train.distributed import init, read_env
from npp.train.mfu import PEAK_BF16, peak_flops
from npp.train.step import standalone_step


def stream_rate(paths: list[str], per_shard: int, batch: int, workers: int, seconds: float = 3.0) -> float:
    """Steady-state samples/s (timed over `seconds`, after the first batch: fork and shuffle-buffer fill)."""
    stream = CodeStream(paths, [per_shard] * len(paths), batch_size=batch, num_workers=workers, shuffle_buffer=5000)
    it = iter(make_loader(stream, workers))
    next(it)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-Mini")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--views", type=int, default=20, help="views per sample in the shards (ImageNet recipe: 20)")
    ap.add_argument("--mfu", type=float, default=0.35, help="MFU at which the H200's demand is computed")
    args = ap.parse_args()

    device = init(read_env())
    cuda = device.type == "cuda"
    cfg = gpt_config(args.model, vocab_size=16384, block_size=256, num_classes=1000)
    step = standalone_step(cfg, TrainConfig(shards="-", out="-", model=args.model, global_batch=args.batch, ema=True,
                                            ds_config="ds_configs/zero2.json"), device)
    idx = torch.randint(0, 16384, (args.batch, 256), device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    rates = {}
    for k in (4, 2, 1):
        for i in range(args.steps + 1):
            if i == 1:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            step([(idx, labels)], k)
        if cuda:
            torch.cuda.synchronize()
        rates[k] = args.steps * args.batch / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for s in range(8):
            samples = [Sample(f"s{s:02d}_{i:05d}", rng.integers(0, 16384, (args.views, 16, 16)).astype(np.uint16),
                              int(i % 1000)) for i in range(1000)]
            path = Path(tmp) / f"train-{s:06d}.tar"
            path.write_bytes(encode_tar(samples))
            paths.append(str(path))
        stream = {workers: stream_rate(paths, 1000, args.batch, workers) for workers in (0, 1, 2)}

    peak = peak_flops(device)
    n_params = sum(p.numel() for p in step.engine.module.parameters())
    print(f"{args.model} ({n_params / 1e6:.1f}M params), 16x16 grid, vocab 16384, micro-batch {args.batch}, "
          f"{'CUDA bf16-mixed' if cuda else f'CPU fp32, {torch.get_num_threads()} threads'}, ZeRO-2, EMA")
    for k, r in rates.items():
        mfu = f"  MFU {r * train_flops_per_sample(cfg, k) / peak:.1%}" if peak else ""
        print(f"trainer k={k}: {r:9.1f} samples/s per process{mfu}")
    h200 = dict(PEAK_BF16)["H200"]
    demand = h200 * args.mfu / train_flops_per_sample(gpt_config("GPT-B", block_size=256), 4)
    print(f"data stream ({args.views} views per sample), samples/s: in-process {stream[0]:.0f}, "
          f"1 worker {stream[1]:.0f}, 2 workers {stream[2]:.0f} ({stream[2] / 2:.0f} per worker)")
    print(f"H200 at GPT-B k=4, {args.mfu:.0%} MFU (computed from FLOPs): {demand:.0f} samples/s per GPU -> "
          f"{demand / (stream[2] / 2):.1f} workers per GPU at this machine's per-worker rate; "
          f"1 worker = {stream[1] / max(rates.values()):.1f}x this machine's fastest trainer step (k=4)")


if __name__ == "__main__":
    main()
