"""A tiny real shard set (toy images → untrained small VQ → shards) and a launcher for 2-process runs."""

import os
import subprocess

from npp.app.launch import torchrun_train_cmd


def train_args(shards, out, **overrides):
    return {"shards": shards, "out": out, "model": "GPT-Nano", "global_batch": 16, "total_steps": 16, "workers": 1,
            "log_every": 4, "ckpt_every": 4, "warmup_epochs": 0.5, "lr": 3e-3, "end_lr": 1e-4, "shuffle_buffer": 20,
            "ds_config": os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero2.json"),
            "schedule": "4:0.25,2:0.25,1:0.5", **overrides}


def launch_cmd(shards, out, nproc=2, **overrides):
    return torchrun_train_cmd(nproc, train_args(shards, out, **overrides))


def run_env(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def launch(shards, out, tmp_path, nproc=2, timeout=300, env=None, **overrides):
    proc = subprocess.run(launch_cmd(shards, out, nproc, **overrides), env={**run_env(tmp_path), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def process_tree(pid):
    """pid and every descendant (ranks run in their own sessions under torchrun, so a process group misses them)."""
    out = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        out += process_tree(int(child))
    return out


def signal_job(pid, sig):
    """Send `sig` to every process of the job at once, as SLURM does: the tree is frozen first so nothing
    forks or exits between listing and signalling (loader workers are processes too)."""
    import signal as _signal

    pids = process_tree(pid)
    for p in pids:
        try:
            os.kill(p, _signal.SIGSTOP)
        except ProcessLookupError:
            pass
    pids = sorted(set(pids + [q for p in pids for q in process_tree(p)]))
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    if sig != _signal.SIGKILL:
        for p in pids:
            try:
                os.kill(p, _signal.SIGCONT)
            except ProcessLookupError:
                pass
    return pids


def read_metrics(run):
    """metrics.jsonl as a list of records (every line: a step written twice shows up twice)."""
    import json

    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
