"""The EMA and the optimizer are built where the weights live; the EMA is kept once and resumes exactly."""

import subprocess
import time

import pytest
import torch

from npp.models import gpt_config
from npp.train.config import TrainConfig
from npp.train.ema import EMA
from npp.train.trainer import build_model_and_optimizer
from tests.train.conftest import launch, launch_cmd, read_metrics, run_env

META = torch.device("meta")  # a device that is not the CPU: whatever is built on the CPU by mistake shows


def _model_cfg():
    return gpt_config("GPT-Nano", vocab_size=64, block_size=64, grid=(8, 8), num_classes=10)


def test_optimizer_is_built_over_parameters_already_on_the_device():
    model, opt = build_model_and_optimizer(_model_cfg(), TrainConfig(shards="s", out="o"), META)
    devices = {p.device for g in opt.param_groups for p in g["params"]}
    assert devices == {META} and next(model.parameters()).device == META
    assert all(not g.get("fused") for g in opt.param_groups)  # fused only for CUDA


def test_ema_lives_on_the_device_of_the_module_and_only_where_kept():
    model, _ = build_model_and_optimizer(_model_cfg(), TrainConfig(shards="s", out="o"), META)
    ema = EMA(model, 0.99)
    assert {p.device for p in ema.model.parameters()} == {META}
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    ema.update(model)  # device-local arithmetic: no CPU tensor meets a device tensor
    other = EMA(model, 0.99, keep=False)
    assert other.model is None
    other.update(model)
    assert other.updates == 1


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
