"""`make gpu-check` runs on a GPU only when one is lent; its --rehearse runs the same code on the CPU, so the
script is known to work (every part, every figure) before a GPU session spends its minutes on it."""

import json
import subprocess
import sys

import pytest

from tests.helpers import run_env


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--rehearse", "--nocompile", "--out", str(out)],
                          env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train = [r for r in rows if r["check"] == "train"]
    assert len(train) == 4 * 3 and {r["k"] for r in train} == {4, 2, 1}  # 4 model/micro-batch settings x 3 sides
    for r in train:
        assert r["npp_ms"] > 0 and r["plain_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["npp_vs_plain"] > 0
    schedule = [r for r in rows if r["check"] == "schedule"]
    assert len(schedule) == 8 and all(0 < r["flops_vs_ntp"] < 0.6 for r in schedule)
    memory = [r for r in rows if r["check"] == "memory"]
    assert [r["activation_checkpointing"] for r in memory] == [False, True, False, True]
    engines = [r for r in rows if r["check"] == "engine"]
    assert engines and not [r for r in engines if "error" in r], engines
    assert {r["ds_config"] for r in engines} == {"ds_configs/zero3.json", "ds_configs/zero2.json"}
    sampling = [r for r in rows if r["check"] == "sample"]
    assert len(sampling) == 4 and all(r["images_per_s"] > 0 and r["limit_images_per_s"] > 0 for r in sampling)
    phases = [r for r in rows if r["check"] == "eval_phases"]
    assert len(phases) == 1 and all(phases[0][f"{k}_s"] > 0 for k in ("generate", "decode", "inception", "statistics"))
    assert [r for r in rows if r["check"] == "inception"]
    assert "| check | settings | figures |" in proc.stdout

