"""Throughput is step time alone: saves, evaluations and logging are timed apart and reported beside it."""

import json

import torch

from npp.train.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_save_and_an_eval_are_not_folded_into_the_step_rate(tmp_path):
    clock = Clock()
    progress = Progress(tmp_path / "metrics.jsonl", True, torch.device("cpu"), log_every=4, total_steps=8, clock=clock)
    for step in range(1, 5):
        clock.now += 0.5  # a training step
        if step == 2:
            with progress.exclude("ckpt"):
                clock.now += 7.0  # a checkpoint save
        if step == 3:
            with progress.exclude("eval"):
                clock.now += 11.0
        with progress.exclude("log"):
            clock.now += 0.25
        logged = progress.record(step, torch.tensor(2.0), 4, 1e-4, 1e9)
    assert logged
    metrics = progress.window_metrics(world_size=1, global_batch=64, tokens_per_sample=256, peak=None, grad_norm=None)
    assert metrics["step_s"] == 0.5
    assert metrics["samples_per_s"] == 64 / 0.5
    assert (metrics["ckpt_s"], metrics["eval_s"], metrics["log_s"]) == (7.0, 11.0, 1.0)
    # the next window starts from zero
    clock.now += 1.0
    progress.record(5, torch.tensor(2.0), 4, 1e-4, 1e9)
    metrics = progress.window_metrics(world_size=1, global_batch=64, tokens_per_sample=256, peak=None, grad_norm=None)
    assert metrics["step_s"] == 1.0 and metrics["ckpt_s"] == 0.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]


def test_each_line_says_step_of_total_elapsed_and_an_eta_priced_in_flops(tmp_path):
    """NPP's stages differ in cost per step: the ETA prices the FLOPs left at the measured seconds per FLOP of the
    steps (saves and evals excluded from that rate, then added at their own rate per FLOP)."""
    from npp.models.configs import gpt_config
    from npp.train.schedule import PatchSchedule, parse_schedule

    cfg = gpt_config("GPT-Nano", vocab_size=64, block_size=64, grid=(8, 8))
    schedule = PatchSchedule(parse_schedule("4:0.5,1:0.5", cfg.grid), 20)
    per_sample = schedule.flops_per_sample(cfg)
    assert per_sample[1] > 3 * per_sample[0]  # a k=1 step costs several k=4 steps
    clock = Clock()
    progress = Progress(tmp_path / "m.jsonl", True, torch.device("cpu"), log_every=5, total_steps=20, clock=clock,
                        flops_left=lambda step: 8 * schedule.flops_left(step, per_sample))
    for step in range(1, 6):  # five k=4 steps of 0.5 s and one 2 s save
        clock.now += 0.5
        if step == 3:
            with progress.exclude("ckpt"):
                clock.now += 2.0
        progress.record(step, torch.tensor(1.0), 4, 1e-4, 8 * per_sample[0])
    metrics = progress.window_metrics(world_size=1, global_batch=8, tokens_per_sample=4, peak=None, grad_norm=None)
    seconds_per_flop = (2.5 + 2.0) / (5 * 8 * per_sample[0])
    expected = (5 * per_sample[0] + 10 * per_sample[1]) * 8 * seconds_per_flop
    assert abs(progress.eta_s(5) - expected) < 1e-6
    lines = []
    progress.line(5, metrics, lines.append)
    eta = int(round(expected))
    assert lines[0].startswith(f"step=5/20 elapsed=0:00:04 eta={eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d} "
                               "loss=1"), lines
    assert schedule.flops_left(0, per_sample) == 10 * per_sample[0] + 10 * per_sample[1]
    assert schedule.flops_left(20, per_sample) == 0
