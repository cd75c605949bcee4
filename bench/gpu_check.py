"""One-shot GPU check: the CUDA paths an 8xH100/H200 user runs first, on one GPU, in a few minutes.

Prints one JSON line per figure and a table at the end. Everything runs through the
project's own components (build_ds_config, build_model_and_optimizer, DeepSpeed's
engine, the EMA, generate, the FID Inception) on synthetic data it makes itself:
- GPT-B, ZeRO-2, bf16-mixed and bf16, 30 steps at each of k = 4, 2, 1, EMA on:
  samples/s, tokens/s, MFU, peak memory;
- GPT-B at k=4 with and without one host read of the loss per step (what the trainer
  did before --sync-every): the cost of a sync per step, side by side;
- GPT-XXL at micro-batch 8 and 32, with and without activation checkpointing: peak
  memory of one step, or a clean OOM report;
- sampling 64 GPT-B images with CFG in bf16: images/s and KV-cache bytes;
- Inception features of 256 images (random weights: speed only): images/s.
On a machine without CUDA it says so and exits 0 without doing anything.

    make gpu-check            # or: .venv/bin/python bench/gpu_check.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def emit(rows: list, **fig) -> None:
    rows.append(fig)
    print(json.dumps(fig), flush=True)


def train_figures(rows: list, model_name: str, precision: str, micro: int, sides: list[int], steps: int,
                  ckpt: bool, ema: bool, host_read: bool = False) -> None:
    import deepspeed
    import torch

    from npp.models.configs import gpt_config, train_flops_per_sample
    from npp.train.config import TrainConfig
    from npp.train.ds_config import build_ds_config
    from npp.train.ema import EMA
    from npp.train.mfu import peak_flops
    from npp.train.trainer import build_model_and_optimizer

    device = torch.device("cuda", 0)
    cfg = TrainConfig(shards="-", out="-", model=model_name, global_batch=micro, precision=precision,
                      ds_config="ds_configs/zero2.json", activation_checkpointing=ckpt)
    mcfg = gpt_config(model_name, vocab_size=16384, block_size=256, num_classes=1000)
    ds = build_ds_config(cfg, 1, True)
    torch.cuda.reset_peak_memory_stats()
    model, opt = build_model_and_optimizer(mcfg, cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    ema_obj = EMA(engine.module, 0.9999, master_weights=precision != "bf16") if ema else None
    idx = torch.randint(0, 16384, (micro, 256), device=device)
    labels = torch.randint(0, 1000, (micro,), device=device)
    for k in sides:
        flops = train_flops_per_sample(mcfg, k) * micro
        for i in range(steps + 3):  # 3 warm-up steps
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                _, loss = engine(idx, labels, targets=idx, patch=k)
            engine.backward(loss)
            engine.step()
            if ema_obj is not None:
                ema_obj.update(engine.module)
            if host_read:
                loss.item()  # the host waits for the GPU here
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        peak = peak_flops(device)
        emit(rows, check="train", model=model_name, precision=precision, k=k, micro_batch=micro,
             activation_checkpointing=ckpt, ema=ema, host_read_per_step=host_read, samples_per_s=micro / dt, tokens_per_s=micro * 256 / dt,
             mfu=(flops / dt / peak) if peak else None, peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30,
             loss=float(loss))
    del engine, model, opt, ema_obj
    torch.cuda.empty_cache()


def memory_figure(rows: list, micro: int, ckpt: bool) -> None:
    import torch

    try:
        train_figures(rows, "GPT-XXL", "bf16-mixed", micro, [1], 1, ckpt, False)
    except torch.cuda.OutOfMemoryError as e:
        emit(rows, check="train", model="GPT-XXL", micro_batch=micro, activation_checkpointing=ckpt,
             oom=str(e).splitlines()[0][:200])
        torch.cuda.empty_cache()


def sampling_figure(rows: list) -> None:
    import torch

    from npp.models import GPT, gpt_config
    from npp.models.generate import generate, kv_cache_bytes

    cfg = gpt_config("GPT-B", vocab_size=16384, block_size=256, num_classes=1000)
    model = GPT(cfg).cuda().to(torch.bfloat16).eval()
    labels = torch.arange(64, device="cuda") % 1000
    generate(model, labels[:8], cfg_scale=2.0, seed=0)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, labels, cfg_scale=2.0, seed=0)
    torch.cuda.synchronize()
    emit(rows, check="sample", model="GPT-B", batch=64, cfg=2.0, precision="bf16",
         images_per_s=64 / (time.perf_counter() - t0), kv_cache_bytes=kv_cache_bytes(cfg, 64, torch.bfloat16))


def inception_figure(rows: list) -> None:
    import numpy as np
    import torch

    from npp.eval.features import extract
    from npp.models.inception import FIDInception

    net = FIDInception()
    images = np.random.default_rng(0).integers(0, 256, (256, 256, 256, 3), dtype=np.uint8)
    extract(net, images[:32], desc="warm-up")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    extract(net, images, batch=128, desc="inception")
    torch.cuda.synchronize()
    emit(rows, check="inception", images=256, tf32=torch.backends.cuda.matmul.allow_tf32,
         images_per_s=256 / (time.perf_counter() - t0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing was run (this check needs one NVIDIA GPU)")
        return 0
    from npp.train.distributed import read_env

    read_env()  # a world of one on a free local port, as a plain `npp train` gets
    rows: list = []
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    for precision in ("bf16-mixed", "bf16"):
        train_figures(rows, "GPT-B", precision, 32, [4, 2, 1], args.steps, ckpt=False, ema=True)
    for host_read in (True, False):
        train_figures(rows, "GPT-B", "bf16-mixed", 32, [4], args.steps, ckpt=False, ema=False, host_read=host_read)
    for micro in (8, 32):
        for ckpt in (False, True):
            memory_figure(rows, micro, ckpt)
    sampling_figure(rows)
    inception_figure(rows)
    print("\n| check | settings | figures |\n|---|---|---|")
    for r in rows:
        settings = {k: v for k, v in r.items() if k in ("model", "precision", "k", "micro_batch",
                                                         "activation_checkpointing", "batch", "images",
                                                         "host_read_per_step")}
        figs = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()
                if k not in settings and k != "check"}
        print(f"| {r['check']} | {settings} | {figs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
