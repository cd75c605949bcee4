"""The EMA and the optimizer are built where the weights live; the EMA is kept once (or partitioned over the
ranks) and resumes exactly."""

import subprocess
import textwrap
import time

import pytest
import torch

from npp.models import gpt_config
from npp.runtime.ranks import free_port
from npp.train.config import TrainConfig
from npp.train.ema import EMA
from npp.train.step import build_model_and_optimizer, settings_of
from tests.helpers import launch, launch_cmd, rank_results, read_metrics, run_env

META = torch.device("meta")  # a device that is not the CPU: whatever is built on the CPU by mistake shows


def _model_cfg():
    return gpt_config("GPT-Nano", vocab_size=64, block_size=64, grid=(8, 8), num_classes=10)


def test_optimizer_is_built_over_parameters_already_on_the_device(monkeypatch):
    """The devices are read when AdamW is constructed: that is where a fused AdamW refuses CPU parameters
    (moving the model afterwards would move the same parameters, and hide the bug)."""
    seen = {}

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            params = list(params)
            seen["devices"] = {p.device for g in params for p in g["params"]}
            seen["fused"] = kw.get("fused")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    model, opt = build_model_and_optimizer(_model_cfg(), *settings_of(TrainConfig(shards="s", out="o")), META, "fp32")
    assert isinstance(opt, Recording) and seen["devices"] == {META}
    assert seen["fused"] is False  # fused only for CUDA


def test_ema_lives_on_the_device_of_the_module_and_only_where_kept():
    model, _ = build_model_and_optimizer(_model_cfg(), *settings_of(TrainConfig(shards="s", out="o")), META, "fp32")
    ema = EMA(model, 0.99)
    assert {p.device for p in ema.model.parameters()} == {META}
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    ema.update(model)  # device-local arithmetic: no CPU tensor meets a device tensor
    other = EMA(model, 0.99, keep=False)
    assert other.model is None
    other.update(model)
    assert other.updates == 1


PARTITIONED = textwrap.dedent('''
    import json, sys
    import torch
    from npp.models import gpt_config
    from npp.train.config import TrainConfig
    from npp.train.distributed import init, read_env
    from npp.train.ds_config import build_ds_config
    from npp.train.ema import EMA, PartitionedEMA
    from npp.train.step import TrainStep, build_model_and_optimizer, settings_of, start_engine

    env = read_env()
    device = init(env)
    model_cfg = gpt_config("GPT-Nano", vocab_size=64, block_size=64, grid=(8, 8), num_classes=10)
    results = {}
    for precision, zero in (("fp32", "zero2"), ("bf16", "zero2"), ("fp32", "zero1"), ("bf16", "zero1")):
        cfg = TrainConfig(shards="-", out="-", model="GPT-Nano", global_batch=8, precision=precision, ema=True,
                          ema_decay=0.5, ds_config=f"ds_configs/{zero}.json", compile="off")
        ds = build_ds_config(cfg, env.world_size, False, precision, params=1000)
        torch.manual_seed(0)
        model, opt = build_model_and_optimizer(model_cfg, *settings_of(cfg), device, precision)
        engine, ema, _ = start_engine(model, opt, ds, settings_of(cfg)[0], precision, device, keep_ema=True)
        assert isinstance(ema, PartitionedEMA), type(ema)
        whole = EMA(engine.module, 0.5, keep=True, master_weights=precision != "bf16")  # the rank-0 keeper, on all
        held = sum(t.numel() for t in ema._parts)
        step = TrainStep(engine, ema)
        gen = torch.Generator().manual_seed(env.rank)
        for _ in range(4):
            idx = torch.randint(0, 64, (4, 64), generator=gen)
            assert step([(idx, torch.randint(0, 10, (4,), generator=gen))], 2) is not None
            whole.update(engine.module)
        saved_file = ema.state_dict()  # rank 0's, in the saved format; None on the other rank
        ref = whole.state_dict()
        assert (saved_file is None) == (env.rank != 0) and (saved_file is None or saved_file["updates"] == 4)
        mine = {"model": {k: v.cpu().clone() for k, v in ema._full().items()}, "updates": ema.updates}
        same = sorted(mine["model"]) == sorted(ref["model"]) and all(
            torch.equal(mine["model"][k], ref["model"][k].cpu()) for k in ref["model"])
        if saved_file is not None:
            same = same and list(saved_file["model"]) == list(ref["model"]) and all(
                torch.equal(saved_file["model"][k], ref["model"][k].cpu()) for k in ref["model"])
        saved = mine["model"]
        for part in ema._parts:
            part.zero_()
        ema.load_state_dict(mine)  # a resumed rank cuts its partition out of the saved whole
        again = ema._full()
        restored = all(torch.equal(again[k].cpu(), saved[k]) for k in saved)
        total = sum(p.numel() for p in engine.module.parameters())
        results[f"{precision} {zero}"] = {"same": same, "restored": restored, "held": held, "total": total,
                              "updates": mine["updates"]}
        engine.destroy()
    with open(f"{sys.argv[1]}/result_{env.rank}.json", "w") as fh:  # a file per rank: printed lines interleave
        json.dump(results, fh)
''')


def test_the_partitioned_ema_is_the_whole_ema_cut_across_ranks(tmp_path):
    """Two ranks under ZeRO-2 (and ZeRO-1, with DeepSpeed's BF16_Optimizer under bf16): each averages its half of
    the fp32 master weights; gathered, the average is the whole-model EMA's to the bit (fp32 weights, and
    DeepSpeed's bf16 with fp32 masters); a saved average loads back into the partitions exactly."""
    for rank, results in enumerate(rank_results(tmp_path, "partitioned.py", PARTITIONED)):
        for precision, got in results.items():
            assert got["same"] and got["restored"] and got["updates"] == 4, (rank, precision, got)
            assert got["held"] < 0.6 * got["total"]  # each rank keeps about half (its partition, padded)


@pytest.mark.slow
def test_ema_is_saved_restored_and_exported(shard_set, tmp_path):
    args = dict(total_steps=16, ckpt_every=1000, log_every=4, ema=True, ema_decay=0.9)
    ref = tmp_path / "ref"
    launch(shard_set, ref, tmp_path, **args)
    run = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(shard_set, run, **args), env=run_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(run)) < 5 and proc.poll() is None:
        time.sleep(0.02)
    (run / "STOP").write_text("")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "stop requested" in out, out[-2000:]
    launch(shard_set, run, tmp_path, **args)
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert set(a["ema"]) == set(a["model"])
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])  # an average, not a copy
    for k in a["ema"]:  # the EMA resumed exactly
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_zero3_offload_config_initializes_and_steps_with_deepspeeds_cpu_adam(monkeypatch):
    """ds_configs/zero3_offload.json as the GPU path builds it (offload kept, bf16), on CPU with gloo.

    The first run JIT-builds DeepSpeed's cpu_adam op (about a minute on 2 cores; cached after)."""
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from npp.train.distributed import skip_jit_shm_op
    from npp.train.ds_config import build_ds_config
    from npp.train.step import offloads_optimizer

    for k, v in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    ).items():
        monkeypatch.setenv(k, v)
    cfg = TrainConfig(shards="s", out="o", model="GPT-Nano", global_batch=4, precision="bf16",
                      ds_config="ds_configs/zero3_offload.json")
    ds = build_ds_config(cfg, 1, cuda=True, precision="bf16")  # what a GPU run gets
    assert offloads_optimizer(ds) and ds["zero_optimization"]["stage"] == 3
    ds["zero_optimization"]["reduce_scatter"] = False  # gloo has no reduce_scatter (NCCL does)
    model, opt = build_model_and_optimizer(_model_cfg(), *settings_of(cfg), torch.device("cpu"), "bf16", offload=True)
    assert isinstance(opt, DeepSpeedCPUAdam)
    skip_jit_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        idx, labels = torch.randint(0, 64, (4, 64)), torch.randint(0, 10, (4,))
        losses = []
        for _ in range(3):
            _, loss = engine(idx, labels, targets=idx, patch=1)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    finally:
        torch.distributed.destroy_process_group()
    assert losses[-1] < losses[0]


def test_rng_files_load_with_weights_only_and_restore_every_generator(tmp_path):
    import pickle
    import random

    import numpy as np

    from npp.train.checkpointing import load_rng_state, rng_state, set_rng_state

    random.random(), np.random.normal(), torch.rand(1)  # numpy now holds a cached gaussian
    torch.save(rng_state(), tmp_path / "rng.pt")
    with open(tmp_path / "rng.pt", "rb") as fh:  # plain tensors and numbers: nothing to unpickle beyond them
        assert torch.load(fh, weights_only=True)
    legacy = {"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(legacy, tmp_path / "legacy.pt")  # the format of earlier checkpoints
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "legacy.pt", weights_only=True)
    expected = (random.random(), np.random.normal(), float(torch.rand(1)))
    for name in ("rng.pt", "legacy.pt"):
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        set_rng_state(load_rng_state(tmp_path / name))
        assert (random.random(), np.random.normal(), float(torch.rand(1))) == expected, name
