"""One-shot GPU check: npp's training step beside a plain PyTorch step of the same model, on one GPU.

Everything runs through the project's own components on synthetic data it makes itself:
the trainer's step (`npp.train.step.TrainStep`: DeepSpeed engine, clipping, EMA) as
`npp train` builds it (`build_ds_config`, `build_model_and_optimizer`, `start_engine`:
compiled blocks, bf16-mixed), timed beside
- a plain PyTorch step of the same GPT: fp32 weights, fused AdamW, bf16 autocast around
  the model, gradient clipping, the same compiled blocks;
- forward + backward alone (the floor any optimizer step adds to).
Figures, one JSON line each and a table at the end, by part (`--only`; bench/gpu_session.sh runs each as a
process of its own, in this order, so a short session has the first ones whatever happens later):
- sample: GPT-B and GPT-XXL at batch 256, bf16 (below);
- launch: a real `npp train` (below);
- train: GPT-B micro-batch 128 and 32 at k = 4 and 1: ms per step, MFU against the bf16 peak, npp/plain,
  k = 4 against k = 1, device syncs per step (the accelerator's and torch.cuda's synchronize, counted);
  timers: GPT-B mb 32 k = 4 with DeepSpeed's ThroughputTimer on (its default) beside off (npp's);
- xxl: GPT-XXL micro-batch 32 at k = 1;
- extras: GPT-B mb 32 and GPT-XXL mb 8 at k = 4, 2, 1 with the NPP schedule's wall-clock ratio against
  next-token training (per-k step times weighted by the schedule's step shares), and everything below;
- memory: GPT-XXL peak memory of a step with and without activation checkpointing;
- engines: GPT-B with ds_configs/zero3.json, zero3_offload.json and --precision bf16;
- ema: the EMA's update per step beside the step (GPT-B mb 32, GPT-XXL mb 8);
- launch: a real `npp train` on toy shards, 2 processes over NCCL with 2 GPUs, else as srun's 4th task of a
  node with one visible GPU (the process group's device binding);
- sample: GPT-B and GPT-XXL at batch 64 and 256 (CFG 2.0, bf16 = the CUDA default, and fp32): images/s, ms per
  token, the GPU's busy share, cudagraph_skips, beside the whole-cache, length-bucket and prefix-only bandwidth
  limits; the wall time per phase of evaluating 10,000 GPT-B samples;
- inception: FID Inception features/s.
The models are built as `npp train` builds them (its default dropout on); TF32 is on in every part, as npp
sets it; each part is guarded, so an out-of-memory or an error is a row and the rest still runs.
Without CUDA it says so and exits 0, unless --rehearse: then the same code runs on the
CPU with tiny models (GPT-Nano/GPT-Tiny, a few steps), to check the script before a GPU
session spends minutes on it (figures there mean nothing).

    make gpu-check                       # or: .venv/bin/python bench/gpu_check.py [--out figures.jsonl]
    .venv/bin/python bench/gpu_check.py --rehearse --nocompile
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from npp.train.config import DEFAULT_SCHEDULE

SCHEDULE = DEFAULT_SCHEDULE


@dataclass
class Setup:
    device: object
    steps: int
    compile: bool
    rehearse: bool
    out: object = None
    rows: list = None
    made: set = field(default_factory=set)  # a rehearsal's training runs already made (see `training`)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def emit(self, **fig) -> dict:
        self.rows.append(fig)
        line = json.dumps(fig)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()
        return fig

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def name(self, model: str) -> str:
        """On --rehearse the big models are stood in for by one small one (a rehearsal checks the code paths and
        the imports, which are the same for every size: each stand-in's run is made once)."""
        return {"GPT-B": "GPT-Nano", "GPT-XXL": "GPT-Nano"}.get(model, model) if self.rehearse else model


def timed(setup: Setup, fn, steps: int, warmup: int = 3) -> float:
    """Seconds per call of fn after `warmup` calls (compilation, allocator, optimizer state)."""
    for _ in range(warmup):
        fn()
    setup.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    setup.sync()
    return (time.perf_counter() - t0) / steps


def model_config(model: str):
    """The GPT as `npp train` builds it for ImageNet 256 (16x16 codes of 16384, 1000 classes) with its default
    flags: attention, residual and FFN dropout on, as the timed steps of a real run have them."""
    from npp.train.config import TrainConfig
    from npp.train.plan import model_config_for

    meta = {"grid": [16, 16], "codebook_size": 16384, "num_classes": 1000}
    return model_config_for(TrainConfig(shards="-", out="-", model=model), meta)


def synthetic_batch(setup: Setup, micro: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16384, (micro, 256), generator=gen).to(setup.device)
    labels = torch.randint(0, 1000, (micro,), generator=gen).to(setup.device)
    return idx, labels


@contextmanager
def npp_engine(setup: Setup, model: str, micro: int, precision: str = "bf16-mixed", ds_config="ds_configs/zero2.json",
               ckpt: bool = False, ema: bool = True, grad_comm: str = "auto", timers: bool = False):
    """npp's own step as `npp train` builds it, on one GPU; freed afterwards. `timers`: DeepSpeed's ThroughputTimer
    back on, as DeepSpeed's default has it (npp turns it off: it synchronizes the device at every forward and step)."""
    import json
    import os

    from npp.train.config import TrainConfig
    from npp.train.step import standalone_step

    if timers:  # the same JSON with the timer on, written beside the check's other temporary files
        with open(ds_config) as fh:
            ds = {**json.load(fh), "timers": {"throughput": {"enabled": True, "synchronized": True}}}
        ds_config = os.path.join(tempfile.gettempdir(), f"npp_gpu_check_timers_{os.getpid()}.json")
        with open(ds_config, "w") as fh:
            json.dump(ds, fh)
    cfg = TrainConfig(shards="-", out="-", model=model, global_batch=micro, precision=precision, ds_config=ds_config,
                      activation_checkpointing=ckpt, ema=ema, compile="on" if setup.compile else "off",
                      grad_comm=grad_comm)
    setup.reset_memory()
    step = standalone_step(model_config(model), cfg, setup.device)
    try:
        yield step
    finally:
        step.engine.destroy()  # DeepSpeed's hooks and buffers go with it
        del step
        setup.reset_memory()


@contextmanager
def plain_model(setup: Setup, model: str):
    """The same GPT as plain PyTorch trains it: fp32 weights, fused AdamW, the same compiled blocks."""
    import torch

    from npp.models.gpt import GPT, configure_optimizer_groups

    setup.reset_memory()
    torch.manual_seed(0)
    net = GPT(model_config(model)).to(setup.device)
    if setup.compile:
        net.compile_blocks()
    opt = torch.optim.AdamW(configure_optimizer_groups(net, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=setup.cuda)
    try:
        yield net, opt
    finally:
        del net, opt
        setup.reset_memory()


def train_rows(setup: Setup, model: str, micro: int, sides=(4, 2, 1)) -> None:
    """npp step, plain step, forward+backward alone, per k; then the schedule's wall-clock ratio."""
    import torch

    from npp.models.configs import train_flops_per_sample
    from npp.train.mfu import peak_flops
    from npp.train.schedule import parse_schedule

    name = setup.name(model)
    cfg = model_config(name)
    peak = peak_flops(setup.device)
    idx, labels = synthetic_batch(setup, micro)
    times: dict = {"npp": {}, "plain": {}, "fwd_bwd": {}}
    syncs: dict = {}
    with npp_engine(setup, name, micro) as step:
        for k in sides:
            times["npp"][k] = timed(setup, lambda k=k: step([(idx, labels)], k), setup.steps)
            syncs[k] = syncs_per_step(lambda k=k: step([(idx, labels)], k))
        npp_peak = setup.peak_gb()
    with plain_model(setup, name) as (net, opt):
        autocast = torch.autocast(setup.device.type, dtype=torch.bfloat16)

        def plain_step(k):
            with autocast:
                _, loss = net(idx, labels, targets=idx, patch=k)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def fwd_bwd(k):
            with autocast:
                _, loss = net(idx, labels, targets=idx, patch=k)
            loss.backward()
            net.zero_grad(set_to_none=True)

        for k in sides:
            times["plain"][k] = timed(setup, lambda k=k: plain_step(k), setup.steps)
            times["fwd_bwd"][k] = timed(setup, lambda k=k: fwd_bwd(k), setup.steps)
    for k in sides:
        flops = train_flops_per_sample(cfg, k) * micro
        row = {"check": "train", "model": name, "micro_batch": micro, "k": k}
        for kind, t in times.items():
            row[f"{kind}_ms"] = t[k] * 1e3
            row[f"{kind}_mfu"] = flops / t[k] / peak if peak else None
        row["npp_vs_plain"] = times["npp"][k] / times["plain"][k]
        row["device_syncs_per_step"] = syncs[k]
        row["k_vs_k1"] = times["npp"][k] / times["npp"][1] if 1 in sides else None
        row["npp_peak_gb"] = npp_peak
        setup.emit(**row)
    if set(sides) >= {4, 2, 1}:
        stages = parse_schedule(SCHEDULE, cfg.grid)
        for kind in ("npp", "plain"):
            wall = sum(s.share * times[kind][s.patch_side] for s in stages) / times[kind][1]
            flop = (sum(s.share * train_flops_per_sample(cfg, s.patch_side) for s in stages)
                    / train_flops_per_sample(cfg, 1))
            setup.emit(check="schedule", model=name, micro_batch=micro, kind=kind, schedule=SCHEDULE,
                       wall_clock_vs_ntp=wall, flops_vs_ntp=flop)


@contextmanager
def counted_syncs():
    """Calls of the accelerator's synchronize and of torch.cuda.synchronize while the block runs (DeepSpeed's
    included): each one makes the host wait for the GPU."""
    import torch
    from deepspeed.accelerator import get_accelerator

    count = {"n": 0}
    acc, real_acc, real_cuda = type(get_accelerator()), type(get_accelerator()).synchronize, torch.cuda.synchronize

    def acc_sync(self, *a, **k):
        count["n"] += 1
        return real_acc(self, *a, **k)

    def cuda_sync(*a, **k):
        count["n"] += 1
        return real_cuda(*a, **k)

    acc.synchronize, torch.cuda.synchronize = acc_sync, cuda_sync
    try:
        yield count
    finally:
        acc.synchronize, torch.cuda.synchronize = real_acc, real_cuda


def syncs_per_step(fn, steps: int = 3) -> float:
    """Device syncs per call of a warmed-up step (counted_syncs)."""
    with counted_syncs() as count:
        for _ in range(steps):
            fn()
    return count["n"] / steps


def timer_rows(setup: Setup, micro: int) -> None:
    """What turning DeepSpeed's ThroughputTimer off gains: GPT-B at k = 4 (the step whose fixed costs weigh most),
    npp's step with the timer on (DeepSpeed's default: a device sync at every forward and step) beside off."""
    name = setup.name("GPT-B")
    idx, labels = synthetic_batch(setup, micro)
    ms = {}
    for timers in (True, False):
        with npp_engine(setup, name, micro, timers=timers) as step:
            ms[timers] = timed(setup, lambda step=step: step([(idx, labels)], 4), setup.steps) * 1e3
            ms[f"syncs_{timers}"] = syncs_per_step(lambda step=step: step([(idx, labels)], 4))
    setup.emit(check="timers", model=name, micro_batch=micro, k=4, timers_on_ms=ms[True], timers_off_ms=ms[False],
               off_vs_on=ms[False] / ms[True], syncs_per_step_on=ms["syncs_True"], syncs_per_step_off=ms["syncs_False"])


def memory_rows(setup: Setup, micro: int) -> None:
    """GPT-XXL peak memory of npp's step with and without activation checkpointing (or a clean OOM report)."""
    import torch

    name = setup.name("GPT-XXL")
    idx, labels = synthetic_batch(setup, micro)
    for ckpt in (False, True):
        try:
            with npp_engine(setup, name, micro, ckpt=ckpt, ema=False) as step:
                t = timed(setup, lambda: step([(idx, labels)], 1), 2, warmup=1)
                setup.emit(check="memory", model=name, micro_batch=micro, k=1, activation_checkpointing=ckpt,
                           peak_gb=setup.peak_gb(), step_ms=t * 1e3)
        except torch.OutOfMemoryError as e:
            setup.emit(check="memory", model=name, micro_batch=micro, k=1, activation_checkpointing=ckpt,
                       oom=str(e).splitlines()[0][:160])


def ema_rows(setup: Setup) -> None:
    """The EMA's cost per step on its own (npp.train.ema's update as the trainer runs it after each optimizer
    step: under ZeRO-2 one fused lerp over this rank's partition, on one GPU the whole model), beside the step it
    belongs to, for GPT-B (mb 32) and GPT-XXL (mb 8) at k = 1."""
    for model, micro in (("GPT-B", 32), ("GPT-XXL", 8)):
        name = setup.name(model)
        micro = micro if setup.cuda else 2

        def run(name=name, micro=micro):
            idx, labels = synthetic_batch(setup, micro)
            with npp_engine(setup, name, micro) as step:
                step_s = timed(setup, lambda: step([(idx, labels)], 1), setup.steps)
                ema_s = timed(setup, lambda: step.ema.update(step.engine.module), setup.steps)
            setup.emit(check="ema", model=name, micro_batch=micro, k=1, step_ms=step_s * 1e3, ema_ms=ema_s * 1e3,
                       ema_share=ema_s / step_s)

        guarded(setup, run, check="ema", model=name, micro_batch=micro)


def launch_rows(setup: Setup, workdir: str) -> None:
    """`npp train` as users start it, on real (toy) shards: the process group bound to the GPU npp picked.
    With 2 GPUs, `torchrun --nproc-per-node 2` (NCCL across two GPUs); with one, as `srun --gpus-per-task=1`
    starts the 4th task of a node (SLURM_LOCALID=3, one visible GPU: the binding DeepSpeed makes with
    init_process_group(device_id=cuda:LOCAL_RANK) must be cuda:0). Seconds to the end of 30 steps, and rc."""
    import os
    import subprocess

    import torch

    from npp.models.vq import VQModel, vq_config
    from npp.pipeline.toy import write_toy_dataset
    from npp.runtime.ranks import free_port
    from npp.tokenize.run import TokenizeConfig, tokenize

    root = os.path.join(workdir, "launch")
    write_toy_dataset(os.path.join(root, "images"), per_class=16, size=32)
    torch.manual_seed(0)
    vq = VQModel(vq_config("VQ-toy", codebook_size=64))
    torch.save({"model": vq.state_dict(), "config": vq.config.to_dict()}, os.path.join(root, "vq.pt"))
    shards = os.path.join(root, "shards")
    tokenize(TokenizeConfig(data=os.path.join(root, "images"), vq=os.path.join(root, "vq.pt"), out=shards,
                            image_size=32, samples_per_shard=20, batch=32, workers=0).plan())
    gpus = torch.cuda.device_count() if setup.cuda else 0
    flags = ["train", "--shards", shards, "--model", "GPT-Nano", "--global-batch", "16", "--total-steps", "30",
             "--workers", "1", "--notracking"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if gpus >= 2:
        mode = "torchrun 2 GPUs"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "npp", *flags, "--out", os.path.join(root, "run2")]
    else:
        mode = "srun task 3 of a node, 1 visible GPU"
        env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="3", SLURM_NODEID="0",
                   SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if setup.cuda:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = [sys.executable, "-m", "npp", *flags, "--out", os.path.join(root, "run1")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    setup.emit(check="launch", mode=mode, rc=proc.returncode, seconds=time.perf_counter() - t0,
               **({} if proc.returncode == 0 else {"error": " | ".join(tail)[-300:]}))


def engine_rows(setup: Setup) -> None:
    """GPT-B through the other engines a user may pick: ZeRO-3, ZeRO-3 with the optimizer on the CPU, DeepSpeed bf16,
    and ZeRO-2 bf16-mixed with the gradients reduced in bf16 (--grad-comm bf16) beside fp32 (on one GPU the
    reduction moves no bytes between GPUs: the row shows the conversions' cost, not the saving)."""
    name = setup.name("GPT-B")
    micro = 32 if setup.cuda else 2
    idx, labels = synthetic_batch(setup, micro)
    runs = [("ds_configs/zero3.json", "bf16-mixed", "auto"), ("ds_configs/zero3_offload.json", "bf16-mixed", "auto"),
            ("ds_configs/zero2.json", "bf16", "auto"), ("ds_configs/zero2.json", "bf16-mixed", "fp32"),
            ("ds_configs/zero2.json", "bf16-mixed", "bf16")]
    for ds_config, precision, grad_comm in runs:
        if setup.rehearse and "offload" in ds_config:
            continue  # build_ds_config drops the offload on CPU: the same run as zero3.json there
        t0 = time.perf_counter()
        try:
            ema = precision == "bf16"  # the EMA's gather of fp32 master weights
            with npp_engine(setup, name, micro, precision=precision, ds_config=ds_config, ema=ema,
                            grad_comm=grad_comm) as step:
                build_s = time.perf_counter() - t0
                for k in (4, 1):
                    t = timed(
                        setup, lambda k=k, step=step: step([(idx, labels)], k), max(3, setup.steps // 3), warmup=2
                    )
                    setup.emit(check="engine", model=name, ds_config=ds_config, precision=precision, k=k,
                               grad_comm=grad_comm,
                               micro_batch=micro, step_ms=t * 1e3, peak_gb=setup.peak_gb(), build_s=build_s)
        except Exception as e:  # one engine failing must not hide the others' figures
            setup.emit(check="engine", model=name, ds_config=ds_config, precision=precision, grad_comm=grad_comm,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


SAMPLE_RUNS = (("GPT-B", 256, "bf16"), ("GPT-XXL", 256, "bf16"))  # the `sample` part: what a session must have
MORE_SAMPLE_RUNS = (("GPT-B", 64, "bf16"), ("GPT-B", 256, "fp32"), ("GPT-XXL", 64, "bf16"), ("GPT-XXL", 64, "fp32"))


def sample_rows(setup: Setup, runs=SAMPLE_RUNS) -> None:
    """GPT-B and GPT-XXL sampling (256 px grid, CFG 2.0) through npp's Sampler as `npp sample` runs it (its token
    step compiled and graph-captured per length bucket) at the default precision on CUDA (bf16 weights and KV
    cache) and at fp32: images/s, ms per token, the GPU's busy share of the token loop (kernel time / wall time,
    from the profiler), beside three bandwidth limits (bytes read per token step at the device-to-device copy
    bandwidth: the weights plus the whole cache, plus the length bucket npp reads, plus the filled prefix alone),
    and dynamo's cudagraph_skips (a skipped capture means host-bound eager replays; expect 0)."""
    import torch

    from npp.models.configs import count_parameters
    from npp.models.generate import Sampler, bucket_lengths, kv_cache_bytes
    from npp.models.gpt import GPT

    bandwidth = measured_bandwidth(setup)
    for model, batch, precision in runs:
        name = setup.name(model)
        batch = batch if setup.cuda else batch // 32
        if not setup.cuda:  # a rehearsal makes each stand-in once per precision, whichever part asks first
            if ("sample", name, precision) in setup.made:
                continue
            setup.made.add(("sample", name, precision))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        def run(name=name, batch=batch, precision=precision, dtype=dtype):
            cfg = model_config(name)
            torch.manual_seed(0)
            net = GPT(cfg).to(setup.device).to(dtype).eval()
            torch.nn.init.normal_(net.output.weight, std=0.02)  # a zero head would draw uniform tokens: keep it real
            torch._dynamo.utils.counters.clear()
            sampler = Sampler(net, batch, guidance=True, compile=setup.compile)
            labels = torch.arange(batch, device=setup.device) % 1000
            sampler.generate(labels, cfg_scale=2.0, seed=0)  # compile, capture
            wall = timed(setup, lambda: sampler.generate(labels, cfg_scale=2.0, seed=1), 1, warmup=0)
            t0 = time.perf_counter()  # again under the profiler, for the GPU's busy share (its overhead inflates wall)
            busy = profiled_busy_seconds(setup, lambda: sampler.generate(labels, cfg_scale=2.0, seed=2))
            profiled_wall = time.perf_counter() - t0
            tokens = cfg.grid[0] * cfg.grid[1]
            weights = count_parameters(cfg) * dtype.itemsize
            kv_full = kv_cache_bytes(cfg, batch, dtype, cfg=True)
            per_slot = kv_full / tokens
            limits = {
                "whole_cache": tokens * (weights + kv_full),
                "buckets": tokens * weights + per_slot * sum(bucket_lengths(tokens, 4)),
                "prefix": tokens * weights + per_slot * tokens * (tokens + 1) / 2,
            }
            setup.emit(check="sample", model=name, batch=batch, cfg=2.0, precision=precision,
                       compiled=sampler.compiled, images_per_s=batch / wall, ms_per_token=wall / tokens * 1e3,
                       gpu_busy_share=(busy / profiled_wall) if busy is not None else None,
                       **{f"limit_{k}_images_per_s": batch * bandwidth / v for k, v in limits.items()},
                       kv_cache_gb=kv_full / 2**30, peak_gb=setup.peak_gb(),
                       cudagraph_skips=int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]))

        guarded(setup, run, check="sample", model=name, batch=batch, precision=precision)


def guarded(setup: Setup, fn, **settings) -> None:
    """One part's figures, or a row saying why it has none (out of memory, an error): the rest of the check goes on."""
    import torch

    setup.reset_memory()
    try:
        fn()
    except torch.OutOfMemoryError as e:
        setup.emit(**settings, oom=str(e).splitlines()[0][:160])
    except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' figures
        setup.emit(**settings, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        setup.reset_memory()


def measured_bandwidth(setup: Setup) -> float:
    """Device-to-device copy bandwidth (bytes/s, read + write counted once each) of a 1 GiB buffer."""
    import torch

    n = (1 << 30) if setup.cuda else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=setup.device)
    b = torch.empty_like(a)
    t = timed(setup, lambda: b.copy_(a), 10, warmup=2)
    return 2 * n / t  # the buffers go with this frame


def profiled_busy_seconds(setup: Setup, fn):
    """Run fn under the profiler; the seconds the GPU spent in kernels (None on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    if not setup.cuda:
        fn()
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        setup.sync()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def eval_phase_rows(setup: Setup) -> None:
    """Wall time per phase of an evaluation of 10,000 GPT-B samples (random weights, a random LlamaGen VQ-16 and
    Inception: speed only): generate (npp's Sampler, bf16, CFG 2.0, its auto batch), VQ decode, Inception
    features, statistics (FID, sFID, IS, precision/recall against a reference of the same size)."""
    import numpy as np
    import torch

    from npp.eval.evaluate import metrics_from_features
    from npp.eval.features import extract
    from npp.eval.sample import DECODE_CHUNK, auto_batch
    from npp.models.generate import Sampler
    from npp.models.gpt import GPT
    from npp.models.inception import FIDInception
    from npp.models.vq import VQModel, decode_bytes_per_image, vq_config
    from npp.pipeline.images import to_uint8_images

    n = 10_000 if setup.cuda else 8
    cfg = model_config(setup.name("GPT-B"))
    setup.reset_memory()
    net = GPT(cfg).to(setup.device).to(torch.bfloat16).eval()
    torch.nn.init.normal_(net.output.weight, std=0.02)
    vq = VQModel(vq_config("VQ-16" if setup.cuda else "VQ-toy", codebook_size=16384)).to(setup.device).eval()
    batch = auto_batch(cfg, torch.bfloat16, True, setup.device, n,
                       decode_bytes=DECODE_CHUNK * decode_bytes_per_image(vq.config, cfg.grid))
    sampler = Sampler(net, batch, guidance=True, compile=setup.compile)
    labels = np.arange(n) % 1000
    seconds = {"generate": 0.0, "decode": 0.0, "inception": 0.0, "statistics": 0.0}
    images = []
    sampler.generate(torch.zeros(1, dtype=torch.long, device=setup.device), cfg_scale=2.0, seed=0)  # compile
    for start in range(0, n, batch):
        lab = torch.from_numpy(labels[start : start + batch]).to(setup.device)
        t0 = time.perf_counter()
        codes = sampler.generate(lab, cfg_scale=2.0, seed=0, sample_ids=range(start, start + len(lab)))
        setup.sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            images.append(to_uint8_images(vq.decode_in_chunks(codes, DECODE_CHUNK).float()))
        setup.sync()
        seconds["generate"] += t1 - t0
        seconds["decode"] += time.perf_counter() - t1
    images = np.concatenate(images)
    t0 = time.perf_counter()
    feats = extract(FIDInception(), images, batch=200, device=setup.device, progress=False)
    seconds["inception"] = time.perf_counter() - t0
    ref = {"mu": feats["pool"].mean(0), "sigma": np.cov(feats["pool"], rowvar=False),
           "mu_s": feats["spatial"].mean(0), "sigma_s": np.cov(feats["spatial"], rowvar=False),
           "features": feats["pool"][::-1].copy()}
    t0 = time.perf_counter()
    metrics_from_features(FIDInception(), feats, ref)
    seconds["statistics"] = time.perf_counter() - t0
    setup.emit(check="eval_phases", model=cfg_name(setup), samples=n, batch=batch,
               **{f"{k}_s": v for k, v in seconds.items()}, total_s=sum(seconds.values()))
    del sampler, net, vq
    setup.reset_memory()


def cfg_name(setup: Setup) -> str:
    return setup.name("GPT-B")


def inception_rows(setup: Setup) -> None:
    import numpy as np

    from npp.eval.features import extract
    from npp.models.inception import FIDInception

    n = 256 if setup.cuda else 8
    net = FIDInception()
    images = np.random.default_rng(0).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    extract(net, images[: min(32, n)], desc="warm-up", progress=False)
    setup.sync()
    t0 = time.perf_counter()
    extract(net, images, batch=128, desc="inception", progress=False)
    setup.sync()
    setup.emit(check="inception", images=n, images_per_s=n / (time.perf_counter() - t0))


def table(rows: list) -> None:
    print("\n| check | settings | figures |\n|---|---|---|")
    keys = ("model", "precision", "grad_comm", "k", "micro_batch", "activation_checkpointing", "batch", "images",
            "ds_config", "kind", "schedule", "samples")
    for r in rows:
        settings = {k: v for k, v in r.items() if k in keys}
        figs = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()
                if k not in settings and k != "check"}
        print(f"| {r['check']} | {settings} | {figs} |")


# In the order a GPU session runs them (bench/gpu_session.sh), each a process of its own under its own budget:
# the rows a short session must not miss first. `extras`: what a longer session adds.
PARTS = ("sample", "launch", "train", "xxl", "extras")
TRAIN_RUNS = (("GPT-B", 128, (4, 1)), ("GPT-B", 32, (4, 1)))
XXL_RUNS = (("GPT-XXL", 32, (1,)),)
MORE_TRAIN_RUNS = (("GPT-B", 32, (4, 2, 1)), ("GPT-XXL", 8, (4, 2, 1)))


def training(setup: Setup, runs) -> None:
    """Training rows of (model, micro-batch, patch sides). A rehearsal's stand-ins make GPT-B's two micro-batches
    the same run, and every part's runs the same few: there each (stand-in, micro-batch) is made once, at every k
    (its code paths are what a rehearsal checks, not its figures)."""
    for model, micro, sides in dict.fromkeys((m, b if setup.cuda else 2, s) for m, b, s in runs):
        if not setup.cuda:
            if (setup.name(model), micro) in setup.made:
                continue
            setup.made.add((setup.name(model), micro))
            sides = (4, 2, 1)
        guarded(setup, lambda m=model, b=micro, s=sides: train_rows(setup, m, b, s), check="train",
                model=setup.name(model), micro_batch=micro)


def run_part(setup: Setup, part: str) -> None:
    if part == "sample":
        sample_rows(setup)
    elif part == "launch":
        with tempfile.TemporaryDirectory() as workdir:
            guarded(setup, lambda: launch_rows(setup, workdir), check="launch")
    elif part == "train":
        training(setup, TRAIN_RUNS)
        guarded(setup, lambda: timer_rows(setup, 32 if setup.cuda else 2), check="timers")
    elif part == "xxl":
        training(setup, XXL_RUNS)
    elif part == "extras":
        training(setup, MORE_TRAIN_RUNS)
        ema_rows(setup)
        for micro in dict.fromkeys(b if setup.cuda else 2 for b in (8, 32)):
            guarded(setup, lambda b=micro: memory_rows(setup, b), check="memory", micro_batch=micro)
        guarded(setup, lambda: engine_rows(setup), check="engine")
        sample_rows(setup, MORE_SAMPLE_RUNS)
        guarded(setup, lambda: eval_phase_rows(setup), check="eval_phases")
        guarded(setup, lambda: inception_rows(setup), check="inception")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="", help="also write the JSON lines to this file")
    ap.add_argument("--only", default="", help="comma list of parts (default: all, in this order): " + ",".join(PARTS))
    ap.add_argument("--rehearse", action="store_true", help="run the same code on the CPU with tiny models")
    ap.add_argument("--nocompile", action="store_true", help="eager blocks (npp train --nocompile)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.rehearse:
        print("gpu-check: no CUDA device here; nothing was run (this check needs one NVIDIA GPU; "
              "--rehearse runs the same code on the CPU with tiny models)")
        return 0
    from npp.runtime.devices import fast_matmul
    from npp.train.distributed import init, read_env

    device = init(read_env())  # a world of one on a free local port, as a plain `npp train` gets
    steps = args.steps if not args.rehearse else min(args.steps, 2)
    out = open(args.out, "a") if args.out else None
    setup = Setup(device, steps, compile=not args.nocompile, rehearse=args.rehearse, out=out, rows=[])
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    fast_matmul(device)  # TF32 for fp32 matmuls in every part, as npp train and npp sample set it
    where = torch.cuda.get_device_name(0) if setup.cuda else "CPU (rehearsal: figures mean nothing)"
    print(f"gpu-check on {where}, torch {torch.__version__}, blocks {'compiled' if setup.compile else 'eager'}",
          flush=True)
    for part in [p for p in PARTS if p in parts]:
        run_part(setup, part)
    table(setup.rows)
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
