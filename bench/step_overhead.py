"""The fixed cost of npp's training step beside a plain PyTorch step, where compute is smallest (k=4).

On a GPU a step's fixed cost is host time: every ATen op the host dispatches is at least
one kernel launch (a few µs), and at GPT-B k=4 a whole step is a few ms of GPU work. So
besides wall time on this machine, this counts the ATen ops each part of a step
dispatches that runs a kernel (a TorchDispatchMode sees each op; views are left out; the
count does not depend on the machine), side by side in one run:
- fwd+bwd: the model's forward and backward alone;
- plain: fwd+bwd, clip_grad_norm_, AdamW step, zero_grad (fp32 weights, as plain PyTorch trains);
- npp: `TrainStep` as `npp train` builds it (DeepSpeed ZeRO-2 engine, clipping), without and with the EMA;
- host reads: the times a step reads a tensor's value on the host (each is a GPU sync there);
- EMA update alone: npp's (under ZeRO-1/2 one fused `_foreach_lerp_` over this rank's flat partition of the
  fp32 master weights), the whole-model fused lerp over every parameter tensor (npp before), and a mul_/add_
  pair per tensor.

    .venv/bin/python bench/step_overhead.py [--model GPT-Nano] [--batch 8] [--k 4]

`--narrow` measures the fixed host cost a GPU pays whatever k: a model with GPT-B's shape (12 layers, its 113
parameter tensors) but 48 wide, a 512-code vocabulary and micro-batch 2, so the arithmetic is negligible and the
step time is the host's per-step work (hooks, per-tensor norms, bucket copies, the optimizer's loop, the EMA).
npp's step (ZeRO-1 and ZeRO-2, with the EMA) is set beside a plain PyTorch step of the same model (fused-style
AdamW, clipping; DDP when there are 2 ranks): run it alone and under `torchrun --nproc-per-node 2`
(`make bench` does both). Ratios only: seconds on a CPU are not a GPU's, the per-step host work is.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from npp.models import gpt_config
from npp.models.gpt import GPT, configure_optimizer_groups
from npp.train.config import TrainConfig
from npp.train.distributed import init, read_env
from npp.train.ema import EMA
from npp.train.step import standalone_step

METADATA_ONLY = {"aten._unsafe_view", "aten.lift_fresh", "aten.alias"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that run a kernel: views (view, detach, slice, t, ...) only change metadata."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func.overloadpacket) not in METADATA_ONLY:
            self.ops += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts reads of a tensor's value by the host (`.item()`, `bool()`, `float()`, `int()`, `.tolist()`): on a GPU
    each waits for every kernel queued before it, so a step with one cannot run ahead of the GPU."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __enter__(self):
        self.reads, self._saved = 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, real in self._saved.items():
            def counted(t, *a, _real=real, **k):
                self.reads += 1
                return _real(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)


def measure(fn, steps: int) -> tuple[float, int, int]:
    """(ms per call, ATen ops per call, host reads per call) after 3 warm-up calls."""
    for _ in range(3):
        fn()
    counter = OpCounter()
    with counter:
        fn()
    with HostReads() as host:
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3, counter.ops, host.reads


def narrow(steps: int, k: int) -> None:
    """npp's step against plain PyTorch on a GPT-B-shaped model whose arithmetic is negligible (see the docstring)."""
    from npp.models.configs import GPTConfig

    env = read_env()
    device = init(env)
    cfg = GPTConfig(dim=48, n_layer=12, n_head=12, vocab_size=512, block_size=256, num_classes=1000,
                    token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    micro = 2
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 512, (micro, 256), generator=gen).to(device)
    labels = torch.randint(0, 1000, (micro,), generator=gen).to(device)
    torch.manual_seed(0)
    net = GPT(cfg).to(device)
    model = net
    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(configure_optimizer_groups(net, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            foreach=True, fused=device.type == "cuda" or None)

    def plain():
        _, loss = model(idx, labels, targets=idx, patch=k)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"plain step" + (" (DDP)" if env.world_size > 1 else ""): plain}
    engines = []
    for ds in ("zero1", "zero2"):
        for ema in (False, True):
            train_cfg = TrainConfig(shards="-", out="-", model="GPT-B", global_batch=micro * env.world_size, ema=ema,
                                    compile="off", ds_config=f"ds_configs/{ds}.json", token_dropout=0.0,
                                    resid_dropout=0.0, ffn_dropout=0.0, attn_dropout=0.0)
            step = standalone_step(cfg, train_cfg, device)
            engines.append(step.engine)
            fns[f"npp {ds}{' + EMA' if ema else ''}"] = lambda step=step: step([(idx, labels)], k)
    # counts once each, then the times in interleaved rounds (median per variant): a CPU's clock and its
    # neighbours drift over a minute, and a sequence of whole measurements would charge that drift to one variant
    rows = {name: list(measure(fn, 1)) for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for _ in range(7):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(max(1, steps // 7)):
                fn()
            times[name].append((time.perf_counter() - start) / max(1, steps // 7) * 1e3)
    for name in rows:
        rows[name][0] = sorted(times[name])[len(times[name]) // 2]
    for engine in engines:
        engine.destroy()
    if env.rank == 0:
        tensors = len(list(net.parameters()))
        print(f"GPT-B-shaped narrow model ({tensors} tensors, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
              f"params), k={k}, micro-batch {micro}, world {env.world_size}, {device.type}, "
              f"{torch.get_num_threads()} threads: the host's fixed cost per step (median of 7 interleaved rounds)")
        base = next(iter(rows.values()))[0]
        print(f"{'':28s} {'ms/step':>9s} {'vs plain':>9s} {'ATen ops':>9s} {'host reads':>11s}")
        for name, (ms, ops, reads) in rows.items():
            print(f"{name:28s} {ms:9.2f} {ms / base:9.2f} {ops:9d} {reads:11d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="GPT-Nano")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--narrow", action="store_true", help="GPT-B's tensors, negligible arithmetic: the fixed cost")
    args = ap.parse_args()
    if args.narrow:
        return narrow(args.steps, args.k)
    device = init(read_env())
    cfg = gpt_config(args.model, vocab_size=16384, block_size=256, num_classes=1000)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16384, (args.batch, 256), generator=gen).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    rows = {}

    torch.manual_seed(0)
    net = GPT(cfg).to(device)
    opt = torch.optim.AdamW(configure_optimizer_groups(net, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")

    def fwd_bwd():
        _, loss = net(idx, labels, targets=idx, patch=args.k)
        loss.backward()
        net.zero_grad(set_to_none=True)

    def plain():
        _, loss = net(idx, labels, targets=idx, patch=args.k)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows["fwd+bwd"] = measure(fwd_bwd, args.steps)
    rows["plain step"] = measure(plain, args.steps)

    for ema in (False, True):
        train_cfg = TrainConfig(shards="-", out="-", model=args.model, global_batch=args.batch, ema=ema, compile="off",
                                ds_config="ds_configs/zero2.json")
        step = standalone_step(cfg, train_cfg, device)
        rows[f"npp step{' + EMA' if ema else ''}"] = measure(
            lambda step=step: step([(idx, labels)], args.k), args.steps
        )
        if ema:
            module, averaged = step.engine.module, step.ema
            rows[f"EMA update, {type(averaged).__name__} (npp)"] = measure(lambda a=averaged, m=module: a.update(m),
                                                                        args.steps)
            whole = EMA(module, 0.9999)
            rows["EMA update, whole model"] = measure(lambda a=whole, m=module: a.update(m), args.steps)
            pairs = list(zip(whole.model.parameters(), module.parameters(), strict=False))

            @torch.no_grad()
            def per_tensor(pairs=pairs):
                for e, p in pairs:
                    e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)

            rows["EMA update, per tensor"] = measure(per_tensor, args.steps)
        step.engine.destroy()

    n_params = sum(p.numel() for p in net.parameters())
    print(f"{args.model} ({n_params / 1e6:.1f}M params, {len(list(net.parameters()))} tensors), k={args.k}, "
          f"micro-batch {args.batch}, {device.type}, {torch.get_num_threads()} threads, fp32, ZeRO-2")
    base_ms, base_ops, _ = rows["plain step"]
    print(f"{'':34s} {'ms/step':>9s} {'vs plain':>9s} {'ATen ops':>9s} {'vs plain':>9s} {'host reads':>11s}")
    for name, (ms, ops, reads) in rows.items():
        print(f"{name:34s} {ms:9.2f} {ms / base_ms:9.2f} {ops:9d} {ops / base_ops:9.2f} {reads:11d}")


if __name__ == "__main__":
    main()
