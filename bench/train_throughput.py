"""Trainer samples/s per process for each patch side, and the data stream alone.

One process, the real DeepSpeed engine (ZeRO-2; gloo on CPU, NCCL + bf16 on CUDA),
a GPT on a 16×16 grid with a 16384 vocabulary. The stream is timed on real
shard tars of the same shape, in-process and through one DataLoader worker, so
the ratio stream / trainer shows the headroom of the data path (target ≥ 10×).
On CUDA the MFU of each k is printed too.

    .venv/bin/python bench/train_throughput.py [--model GPT-Mini] [--batch 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from npp.models import GPT, gpt_config, train_flops_per_sample
from npp.models.gpt import configure_optimizer_groups
from npp.pipeline.shards import Sample, encode_tar
from npp.pipeline.stream import CodeStream, make_loader
from npp.train.distributed import init, read_env
from npp.train.mfu import peak_flops


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
    args = ap.parse_args()
    import deepspeed

    env = read_env()
    device = init(env)
    cuda = device.type == "cuda"
    cfg = gpt_config(args.model, vocab_size=16384, block_size=256, num_classes=1000)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(configure_optimizer_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    ds = {"train_batch_size": args.batch, "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 2, "reduce_scatter": cuda},
          "bf16": {"enabled": cuda}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    idx = torch.randint(0, 16384, (args.batch, 256), device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    rates = {}
    for k in (4, 2, 1):
        for i in range(args.steps + 1):
            if i == 1:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            _, loss = engine(idx, labels, targets=idx, patch=k)
            engine.backward(loss)
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        rates[k] = args.steps * args.batch / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for s in range(8):
            samples = [Sample(f"s{s:02d}_{i:05d}", rng.integers(0, 16384, (2, 16, 16)).astype(np.uint16), int(i % 1000))
                       for i in range(1000)]
            path = Path(tmp) / f"train-{s:06d}.tar"
            path.write_bytes(encode_tar(samples))
            paths.append(str(path))
        in_process = stream_rate(paths, 1000, args.batch, 0)
        one_worker = stream_rate(paths, 1000, args.batch, 1)

    peak = peak_flops(device)
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), 16x16 grid, vocab 16384, "
          f"micro-batch {args.batch}, {'CUDA bf16' if cuda else f'CPU fp32, {torch.get_num_threads()} threads'}, ZeRO-2")
    for k, r in rates.items():
        mfu = f"  MFU {r * train_flops_per_sample(cfg, k) / peak:.1%}" if peak else ""
        print(f"trainer k={k}: {r:9.1f} samples/s per process{mfu}")
    print(f"data stream in-process:   {in_process:9.1f} samples/s")
    print(f"data stream, 1 worker:    {one_worker:9.1f} samples/s  "
          f"({one_worker / max(rates.values()):.1f}x the fastest trainer step, k=4)")


if __name__ == "__main__":
    main()
