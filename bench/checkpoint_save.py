"""How long npp's checkpoint save holds every rank, per rank, and what that predicts for a GPU job.

Builds npp's training step as `npp train` builds it (DeepSpeed engine, EMA) for an ImageNet-shaped model, takes
one optimizer step, then times `npp.train.checkpointing.save` (DeepSpeed's files, the RNG, EMA and counters, the
barrier, `latest` written last) on each rank, and the bytes of one checkpoint. The save blocks training from
its first byte to `latest`: no rank steps until every rank's files are written (a checkpoint counts only when all
are complete). The GPU stall of a real job is the same bytes at the job's filesystem rate; the table at the end
computes it from this run's bytes per parameter for GPT-B and GPT-XXL.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 bench/checkpoint_save.py --model GPT-B
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from npp.models.configs import count_parameters, gpt_config
from npp.pipeline.runs import RunFolder
from npp.train import checkpointing
from npp.train.config import TrainConfig
from npp.train.distributed import init, read_env
from npp.train.plan import model_config_for
from npp.train.step import standalone_step

GPT_B, GPT_XXL = (count_parameters(gpt_config(m, vocab_size=16384, num_classes=1000, block_size=256))
                  for m in ("GPT-B", "GPT-XXL"))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-B")
    ap.add_argument("--ds-config", default="ds_configs/zero2.json")
    ap.add_argument("--saves", type=int, default=3, help="saves timed (the median is printed)")
    args = ap.parse_args()
    env = read_env()
    device = init(env)
    cfg = TrainConfig(shards="-", out="-", model=args.model, global_batch=2 * env.world_size, precision="fp32",
                      ds_config=args.ds_config, ema=True, compile="off")
    model_cfg = model_config_for(cfg, {"grid": [16, 16], "codebook_size": 16384, "num_classes": 1000})
    step = standalone_step(model_cfg, cfg, device)
    idx = torch.randint(0, 16384, (2, 256), device=device)
    step.engine.backward(step.engine(idx, torch.zeros(2, dtype=torch.long, device=device), targets=idx)[1])
    step.engine.step()
    root = Path(tempfile.mkdtemp(prefix="npp_ckpt_bench_")) if env.rank == 0 else None
    shared = [str(root)]
    torch.distributed.broadcast_object_list(shared, src=0)
    run = RunFolder(shared[0])
    seconds = []
    for i in range(args.saves):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        checkpointing.save(step.engine, run, i + 1, {"step": i + 1}, env, step.ema, keep=1)
        seconds.append(time.perf_counter() - t0)
    tag = run.latest_tag()
    report = [None] * env.world_size
    torch.distributed.all_gather_object(report, (env.rank, sorted(seconds)[len(seconds) // 2]))
    if env.rank == 0:
        total = dir_bytes(run.tag_dir(tag))
        params = count_parameters(model_cfg)
        per_param = total / params
        print(f"{args.model} ({params:,} parameters), {env.world_size} ranks, {args.ds_config}, fp32 + EMA, "
              f"CPU ({os.cpu_count()} cores), median of {args.saves} saves, into {root}")
        for rank, s in report:
            print(f"  rank {rank}: save {s:.2f} s")
        print(f"  one checkpoint: {total / 1e9:.2f} GB, {per_param:.1f} bytes per parameter, "
              f"{total / max(s for _, s in report) / 1e9:.2f} GB/s here")
        print("expected stall of a GPU job per save (computed from these bytes per parameter; the job's "
              "filesystem rate decides):")
        for name, n in (("GPT-B", GPT_B), ("GPT-XXL", GPT_XXL)):
            size = n * per_param
            print(f"  {name}: {size / 1e9:.1f} GB: {size / 0.5e9:.0f} s at 0.5 GB/s, {size / 2e9:.0f} s at 2 GB/s")
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    step.engine.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
