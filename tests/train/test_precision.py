"""The three precisions run through the same DeepSpeed path on CPU and track the fp32 loss curve."""

import json

import pytest

from tests.train.conftest import launch, read_metrics

RUN = dict(total_steps=40, ckpt_every=1000, log_every=10, schedule="2:0.5,1:0.5")


@pytest.mark.slow
def test_bf16_mixed_and_bf16_track_fp32(shard_set, tmp_path):
    curves = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        run = tmp_path / precision
        launch(shard_set, run, tmp_path, precision=precision, **RUN)
        curves[precision] = [r["loss"] for r in read_metrics(run)]
        ds = json.loads((run / "ds_config.json").read_text())
        assert ds["bf16"]["enabled"] == (precision == "bf16")
        if precision == "bf16":  # fp32 accumulation and reduction by default
            assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    ref = curves["fp32"]
    for precision in ("bf16-mixed", "bf16"):
        diffs = [abs(a - b) for a, b in zip(curves[precision], ref)]
        assert len(diffs) == 40 and max(diffs) < 0.05, (precision, max(diffs))
        assert max(diffs) > 0, f"{precision} gave fp32's exact curve: bf16 was not in effect"
