"""The three precisions run through the same DeepSpeed path on CPU, as named, and track the fp32 loss curve.

On a GPU, DeepSpeed 0.19's engine.forward asks `torch.is_autocast_enabled()` with no
device, which reports CUDA's autocast, and switches an autocast opened around the
engine off: the first H200 run trained "bf16-mixed" in fp32. On CPU that query reports
CUDA's state too (off), so the switch-off never happened in a CPU test. Here every rank
starts with a `sitecustomize` that makes the no-argument query answer for the CPU, as
it answers for the training device on a GPU, and records the output dtype of every
nn.Linear that runs in a training forward.
"""

import json
import os
import textwrap

import pytest

from tests.helpers import launch, read_metrics

RUN = dict(total_steps=40, ckpt_every=1000, log_every=10, schedule="2:0.5,1:0.5")

SITECUSTOMIZE = textwrap.dedent('''
    import os
    import torch

    _real = torch.is_autocast_enabled

    def _asks_the_training_device(*args):
        return _real(*args) if args else _real("cpu")

    torch.is_autocast_enabled = _asks_the_training_device
    _seen = set()

    def _record(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training and torch.is_grad_enabled():
            if output.dtype not in _seen:
                _seen.add(output.dtype)
                with open(os.path.join(os.environ["NPP_TEST_DTYPES"], "rank" + os.environ.get("RANK", "x")), "a") as fh:
                    fh.write(str(output.dtype) + "\\n")

    torch.nn.modules.module.register_module_forward_hook(_record)
''')

EXPECTED = {"fp32": {"torch.float32"}, "bf16-mixed": {"torch.bfloat16"}, "bf16": {"torch.bfloat16"}}


@pytest.mark.slow
def test_precisions_are_real_and_bf16_tracks_fp32(shard_set, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    curves = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        run, dtypes = tmp_path / precision, tmp_path / f"dtypes-{precision}"
        dtypes.mkdir()
        out = launch(shard_set, run, tmp_path, precision=precision,
                     env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                          "NPP_TEST_DTYPES": str(dtypes)}, **RUN)
        assert f"precision {precision}" in out
        seen = {r.name: set(r.read_text().split()) for r in dtypes.iterdir()}
        assert set(seen) == {"rank0", "rank1"}, seen  # the hook ran in both ranks' training steps
        for rank, kinds in seen.items():
            assert kinds == EXPECTED[precision], (precision, rank, kinds)
        curves[precision] = [r["loss"] for r in read_metrics(run)]
        ds = json.loads((run / "ds_config.json").read_text())
        assert ds["bf16"]["enabled"] == (precision == "bf16")
        if precision == "bf16":  # fp32 accumulation and reduction by default
            assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    ref = curves["fp32"]
    for precision in ("bf16-mixed", "bf16"):
        diffs = [abs(a - b) for a, b in zip(curves[precision], ref, strict=False)]
        assert len(diffs) == 40 and max(diffs) < 0.05, (precision, max(diffs))
        assert max(diffs) > 0, f"{precision} gave fp32's exact curve: bf16 was not in effect"
