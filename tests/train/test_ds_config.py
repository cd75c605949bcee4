"""What npp adds to a DeepSpeed JSON for a run: bucket sizes that fit the model, the gradient reduction's dtype."""

import json
import textwrap

import pytest

from npp.errors import NppError
from npp.models import gpt_config
from npp.models.configs import count_parameters
from npp.train.ds_config import bucket_elements, device_ds_config
from tests.helpers import rank_results

SIZES = dict(micro=8, grad_accum=1, global_batch=8, grad_clip=1.0, cuda=True)


def _params(model: str) -> int:
    return count_parameters(gpt_config(model, vocab_size=16384, block_size=256, num_classes=1000))


def test_buckets_split_the_model_so_reduction_overlaps_backward():
    b, xxl = _params("GPT-B"), _params("GPT-XXL")
    assert bucket_elements(b) == -(-b // 8) and 13_000_000 < bucket_elements(b) < 15_000_000  # 8 buckets, not 1
    assert 170_000_000 < bucket_elements(xxl) < 180_000_000
    assert bucket_elements(1000) == 5_000_000  # a toy model: DeepSpeed's buckets need not be tiny
    zero2 = {"zero_optimization": {"stage": 2}}
    ds = device_ds_config(zero2, precision="bf16-mixed", params=b, **SIZES)["zero_optimization"]
    assert ds["reduce_bucket_size"] == ds["allgather_bucket_size"] == bucket_elements(b)
    mine = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}}  # the JSON's own value is kept
    assert device_ds_config(mine, precision="bf16-mixed", params=b, **SIZES)["zero_optimization"][
        "reduce_bucket_size"] == 123
    with open("ds_configs/zero2.json") as fh:
        assert "reduce_bucket_size" not in json.load(fh)["zero_optimization"]


@pytest.mark.parametrize(("json_value", "flag", "expected"), [
    (None, "auto", "fp32"), ("bf16", "auto", "bf16"), (None, "bf16", "bf16"), ("bf16", "fp32", "fp32"),
])
def test_the_gradient_reduction_dtype(json_value, flag, expected):
    ds = {"zero_optimization": {"stage": 2}}
    if json_value:
        ds["communication_data_type"] = json_value
    for precision in ("bf16-mixed", "bf16"):
        assert device_ds_config(ds, precision=precision, grad_comm=flag, **SIZES)["communication_data_type"] == expected
    with pytest.raises(NppError, match="--grad-comm must be one of auto, fp32, bf16"):
        device_ds_config(ds, precision="bf16-mixed", grad_comm="fp16", **SIZES)


SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from npp.models import gpt_config
    from npp.train.config import TrainConfig
    from npp.train.distributed import init, read_env
    from npp.train.ds_config import build_ds_config
    from npp.train.step import TrainStep, build_model_and_optimizer, settings_of, start_engine

    env = read_env()
    device = init(env)
    model_cfg = gpt_config("GPT-Nano", vocab_size=64, block_size=64, grid=(8, 8), num_classes=10)
    seen = {}
    for comm in ("fp32", "bf16"):
        cfg = TrainConfig(shards="-", out="-", model="GPT-Nano", global_batch=8, precision="bf16-mixed",
                          ds_config="ds_configs/zero2.json", grad_comm=comm, compile="off")
        ds = build_ds_config(cfg, env.world_size, False, "bf16-mixed", params=1000)
        # the branch a GPU takes (zero2.json's reduce_scatter, which npp turns off on CPU): DeepSpeed's bucketed
        # all-reduce per destination rank, which gloo runs too
        ds["zero_optimization"]["reduce_scatter"] = True
        torch.manual_seed(0)
        model, opt = build_model_and_optimizer(model_cfg, *settings_of(cfg), device, "bf16-mixed")
        engine, _, _ = start_engine(model, opt, ds, settings_of(cfg)[0], "bf16-mixed", device, keep_ema=False)
        reduced = []
        for name in ("allreduce_no_retain", "allreduce_and_scatter", "gradient_reduction_w_predivide"):
            real = getattr(engine.optimizer, name)
            def recording(*args, _real=real, **kwargs):
                reduced.append(str(args[1] if len(args) > 1 else kwargs["communication_data_type"]))
                return _real(*args, **kwargs)
            setattr(engine.optimizer, name, recording)
        step = TrainStep(engine, None)
        gen = torch.Generator().manual_seed(env.rank)
        losses = [float(step([(torch.randint(0, 64, (4, 64), generator=gen),
                               torch.randint(0, 10, (4,), generator=gen))], 1)) for _ in range(3)]
        seen[comm] = {"reduced": sorted(set(reduced)), "losses": losses, "bucket": engine.zero_reduce_bucket_size()}
        engine.destroy()
    with open(f"{sys.argv[1]}/result_{env.rank}.json", "w") as fh:
        json.dump(seen, fh)
''')


def test_bf16_gradient_reduction_runs_through_deepspeed(tmp_path):
    """Two ZeRO-2 ranks on DeepSpeed's reduce-scatter path (a GPU's): the gradients are reduced in the dtype
    asked (DeepSpeed converts its bucket), and training goes on."""
    for seen in rank_results(tmp_path, "comm.py", SCRIPT):
        assert seen["fp32"]["reduced"] == ["torch.float32"] and seen["bf16"]["reduced"] == ["torch.bfloat16"]
        assert seen["fp32"]["bucket"] == 5_000_000  # npp's bucket rule reached the engine
        fp32, bf16 = seen["fp32"]["losses"], seen["bf16"]["losses"]
        assert fp32[0] == bf16[0] and all(abs(a - b) < 1e-3 * a for a, b in zip(fp32, bf16, strict=True))
