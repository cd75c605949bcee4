"""`make gpu-check` runs on a GPU only when one is lent; its --rehearse runs the same code on the CPU, so the
script is known to work (every part, every figure) before a GPU session spends its minutes on it."""

import json
import subprocess
import sys

import pytest

from tests.helpers import run_env


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_the_cpu(tmp_path):
    """Through bench/gpu_session.sh, the one script a GPU session runs, part by part in its order, importing only
    what the GPU image holds or the carried wheels bring (bench/gpu_image.py): a wheel missing from the carried
    list fails here, not in the GPU session."""
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--rehearse", "--nocompile"],
                          env={**run_env(tmp_path), "PYTHON": sys.executable, "OUT": str(tmp_path),
                               # every part, in one process (the session's loop runs one per part on the GPU;
                               # here each extra process is 5-8 s of torch and DeepSpeed imports)
                               "PARTS": "sample,launch,train,xxl,extras"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    order = list(dict.fromkeys(r["check"] for r in rows))
    assert order[:3] == ["sample", "launch", "train"]  # what a short session must not miss comes first
    train = [r for r in rows if r["check"] == "train"]
    # a rehearsal makes its one stand-in's run once, at every k (GPT-B and GPT-XXL, every micro-batch)
    assert [(r["model"], r["k"]) for r in train] == [("GPT-Nano", 4), ("GPT-Nano", 2), ("GPT-Nano", 1)]
    for r in train:
        assert r["npp_ms"] > 0 and r["plain_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["npp_vs_plain"] > 0
        assert r["device_syncs_per_step"] == 0  # DeepSpeed's timers are off (the CPU makes no other call)
    timers = [r for r in rows if r["check"] == "timers"]
    assert len(timers) == 1 and timers[0]["syncs_per_step_on"] > 0 and timers[0]["syncs_per_step_off"] == 0
    schedule = [r for r in rows if r["check"] == "schedule"]
    assert len(schedule) == 2 and all(0 < r["flops_vs_ntp"] < 0.6 for r in schedule)  # npp and plain, one model
    memory = [r for r in rows if r["check"] == "memory"]
    assert [r["activation_checkpointing"] for r in memory] == [False, True]
    engines = [r for r in rows if r["check"] == "engine"]
    assert engines and not [r for r in engines if "error" in r], engines
    assert {r["ds_config"] for r in engines} == {"ds_configs/zero3.json", "ds_configs/zero2.json"}
    sampling = [r for r in rows if r["check"] == "sample"]
    # the sample part in bf16, then extras' fp32 (a rehearsal makes its stand-in once per precision)
    assert [(r["model"], r["precision"]) for r in sampling] == [("GPT-Nano", "bf16"), ("GPT-Nano", "fp32")], sampling
    for r in sampling:
        assert r["images_per_s"] > 0 and r["cudagraph_skips"] == 0
        assert r["limit_whole_cache_images_per_s"] < r["limit_buckets_images_per_s"] < r["limit_prefix_images_per_s"]
    ema = [r for r in rows if r["check"] == "ema"]
    assert len(ema) == 2 and all(0 < r["ema_ms"] < r["step_ms"] for r in ema)
    launch = [r for r in rows if r["check"] == "launch"]
    assert len(launch) == 1 and launch[0]["rc"] == 0, launch
    phases = [r for r in rows if r["check"] == "eval_phases"]
    assert len(phases) == 1 and all(phases[0][f"{k}_s"] > 0 for k in ("generate", "decode", "inception", "statistics"))
    assert [r for r in rows if r["check"] == "inception"]
    assert "| check | settings | figures |" in proc.stdout



def test_a_failing_part_is_a_row_and_the_check_goes_on():
    """Out of memory (or any error) in one part: a row saying so; the parts after it still run."""
    import runpy

    import torch

    check = runpy.run_path("bench/gpu_check.py", run_name="gpu_check")
    setup = check["Setup"](torch.device("cpu"), 1, compile=False, rehearse=True, rows=[])

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    check["guarded"](setup, oom, check="sample", model="GPT-XXL")
    check["guarded"](setup, lambda: 1 / 0, check="ema", model="GPT-B")
    check["guarded"](setup, lambda: setup.emit(check="inception", images_per_s=1.0), check="inception")
    assert setup.rows == [
        {"check": "sample", "model": "GPT-XXL", "oom": "CUDA out of memory. Tried to allocate 80.00 GiB"},
        {"check": "ema", "model": "GPT-B", "error": "ZeroDivisionError: division by zero"},
        {"check": "inception", "images_per_s": 1.0},
    ]
