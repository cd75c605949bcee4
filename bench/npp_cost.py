"""Wall time per training sample for each patch side, and the schedule's measured cost vs theory.

Runs forward + backward + AdamW step of a small GPT on a 16×16 token grid on this
machine's CPU for k = 4, 2, 1, then prices the schedule with the measured
per-sample times and prints it next to the FLOP-theoretic ratio
(`npp.train.schedule.schedule_cost_ratio`). All timings come from one run, side by side.

    .venv/bin/python bench/npp_cost.py [--model GPT-Mini] [--batch 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from npp.models import GPT, gpt_config, train_flops_per_sample
from npp.models.gpt import configure_optimizer_groups
from npp.train.config import DEFAULT_SCHEDULE
from npp.train.schedule import parse_schedule, schedule_cost_ratio


def time_per_sample(model: GPT, optimizer, batch: int, patch: int, steps: int) -> float:
    cfg = model.config
    n = cfg.grid[0] * cfg.grid[1]
    gen = torch.Generator().manual_seed(patch)
    data = [
        (
            torch.randint(0, cfg.vocab_size, (batch, n), generator=gen),
            torch.randint(0, cfg.num_classes, (batch,), generator=gen),
        )
        for _ in range(steps + 1)
    ]

    def step(idx, labels):
        _, loss = model(idx, labels, targets=idx, patch=patch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*data[0])  # warm-up: allocator, kernels, optimizer state
    start = time.perf_counter()
    for idx, labels in data[1:]:
        step(idx, labels)
    return (time.perf_counter() - start) / (steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-Mini")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--schedule", default=DEFAULT_SCHEDULE)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = gpt_config(args.model, vocab_size=args.vocab, block_size=args.grid**2, num_classes=1000)
    model = GPT(cfg).train()
    optimizer = torch.optim.AdamW(configure_optimizer_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    stages = parse_schedule(args.schedule, grid=cfg.grid)
    sides = sorted({s.patch_side for s in stages} | {1}, reverse=True)

    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{args.grid}x{args.grid} grid, vocab {args.vocab}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    per_sample = {k: time_per_sample(model, optimizer, args.batch, k, args.steps) for k in sides}
    print(f"{'k':>3} {'positions':>9} {'ms/sample':>10} {'vs k=1':>8} {'theory':>8}")
    for k in sides:
        theory_k = train_flops_per_sample(cfg, k) / train_flops_per_sample(cfg, 1)
        print(f"{k:>3} {(args.grid // k) ** 2:>9} {per_sample[k] * 1e3:>10.2f} "
              f"{per_sample[k] / per_sample[1]:>8.3f} {theory_k:>8.3f}")
    measured = sum(float(s.share) * per_sample[s.patch_side] for s in stages) / per_sample[1]
    theory = schedule_cost_ratio(stages, cfg)
    print(f"schedule {args.schedule}: measured {measured:.3f} x NTP, FLOP theory {theory:.3f} x NTP, "
          f"measured/theory {measured / theory:.3f}")


if __name__ == "__main__":
    main()
