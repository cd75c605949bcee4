"""Helpers the tests share (imported as `from tests.helpers import ...`); fixtures live in the conftest files.

Small models with deterministic weights, the 2-process torchrun launcher of `npp train` and what reads its
run, signalling every process of a job as SLURM does, and a real `mlflow server` on 127.0.0.1.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from npp.app.launch import torchrun_train_cmd
from npp.models import GPT, gpt_config
from npp.models.vq import VQModel, vq_config


def save_small_vq(path, seed=0, codebook_size=64, **overrides):
    """An untrained VQ-toy (32 px -> 8x8 codes) saved as a checkpoint with its config."""
    torch.manual_seed(seed)
    vq = VQModel(vq_config("VQ-toy", codebook_size=codebook_size, **overrides)).eval()
    torch.save({"model": vq.state_dict(), "config": vq.config.to_dict()}, path)
    return vq


def make_gpt(grid=(8, 8), vocab=64, num_classes=5, seed=0, random_head=True, **overrides):
    """A GPT-Nano with a random (not zero) head, so logits depend on the input."""
    torch.manual_seed(seed)
    rows, cols = grid
    cfg = gpt_config(
        "GPT-Nano", vocab_size=vocab, block_size=rows * cols, grid=grid, num_classes=num_classes, **overrides
    )
    model = GPT(cfg)
    if random_head:
        torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store in a folder; stop() and start() again on the same
    port and store (a tracking server restarted for maintenance)."""

    def __init__(self, root):
        from npp.runtime.ranks import free_port

        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        from npp.runtime.mlflow_utils import start_server

        try:
            self.proc = start_server(f"sqlite:///{self.root}/server.db", self.port, str(self.root / "artifacts"),
                                     timeout=timeout)
        except RuntimeError as e:
            pytest.fail(str(e))
        return self

    def stop(self) -> None:
        from npp.runtime.mlflow_utils import stop_server

        if self.proc is not None:
            stop_server(self.proc)
            self.proc = None

    def get(self, path, **params):
        import json
        import urllib.parse
        import urllib.request

        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, payload: dict):
        import json
        import urllib.request

        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def train_args(shards, out, **overrides):
    return {"shards": shards, "out": out, "model": "GPT-Nano", "global_batch": 16, "total_steps": 16, "workers": 1,
            "log_every": 4, "ckpt_every": 4, "warmup_epochs": 0.5, "lr": 3e-3, "end_lr": 1e-4, "shuffle_buffer": 20,
            "ds_config": os.path.join(os.path.dirname(__file__), "..", "ds_configs", "zero2.json"),
            "schedule": "4:0.25,2:0.25,1:0.5", **overrides}


def launch_cmd(shards, out, nproc=2, **overrides):
    return torchrun_train_cmd(nproc, train_args(shards, out, **overrides))


def run_env(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def script_result(tmp_path, name: str, text: str, timeout: int = 300) -> dict:
    """Run a Python script in a process of its own (DeepSpeed keeps its process groups for the life of one) and
    return the JSON it prints after `RESULT `."""
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script)], env=run_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


RANKS_LEAVE_TOGETHER = """
import torch.distributed as _dist
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""


def rank_results(tmp_path, name: str, text: str, nproc: int = 2, timeout: int = 300) -> list[dict]:
    """Run a Python script on `nproc` ranks under torchrun (argv[1]: a folder) and return the JSON each rank wrote
    to `result_<rank>.json` there (a file per rank: lines two ranks print interleave).

    The ranks leave together and close their process group, as `npp train` ends with a barrier: a rank that exits
    while its peer's gloo threads still talk to it was killed by `terminate called without an active
    exception` (SIGABRT) once in CI, at the end of the bf16 gradient-reduction script (not reproduced in 12 reruns)."""
    from npp.runtime.ranks import free_port

    script = tmp_path / name
    script.write_text(text + RANKS_LEAVE_TOGETHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=run_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in range(nproc)]


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


def signal_tree(pid, sig):
    """`sig` to pid and every descendant, as they are now (SIGSTOP/SIGCONT to hold a job still while a test changes
    something around it)."""
    for p in process_tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


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


class cpu_hogs:
    """A busy loop on every core while the block runs (what a shared or oversubscribed node looks like)."""

    def __init__(self, n: int = 0):
        self.n = n or os.cpu_count() or 2
        self.procs: list = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
