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
