"""The progress watchdog: a rank that makes no progress for --collective-timeout ends its job with a line naming
itself, its host, its step, where it waits, and the ranks that went silent (a stopped process publishes nothing)."""

import json
import socket
import threading
import time

import pytest

from npp.train.watchdog import STALLED, ProgressWatchdog


class Store(dict):
    """What the watchdog uses of torch.distributed's store: set and get (bytes)."""

    def set(self, key, value):
        self[key] = value

    def get(self, key):
        return self[key].encode() if isinstance(self[key], str) else self[key]

    def check(self, keys):
        return all(k in self for k in keys)


def waiting_in_a_collective(stop):
    stop.wait(10)


def test_a_stall_is_named_with_the_waiting_stack_and_the_silent_rank():
    store = Store()
    store.set("npp/progress/1", json.dumps({"step": 7, "host": "node-b", "t": time.time() - 100}))  # stopped
    lines, exits, stop = [], [], threading.Event()

    def exit_(code):
        exits.append(code)
        stop.set()

    dog = ProgressWatchdog(0.4, rank=0, world_size=3, store=store, log=lines.append, exit=exit_, poll_s=0.05)
    t0 = time.monotonic()  # before the start: the timeout counts from it
    dog.start(step=12)
    waiting_in_a_collective(stop)  # the main thread blocks, as a rank does in an all-reduce with a stopped peer
    assert exits == [STALLED] and 0.4 <= time.monotonic() - t0 < 3
    line = lines[0]
    assert line.startswith(f"[npp train] rank 0 on {socket.gethostname()}: no optimizer step or save completed")
    assert "at step 12" in line and "waiting_in_a_collective" in line
    assert "rank 1 on node-b (silent for" in line and "at step 7" in line
    assert "rank 2 (no progress published)" in line
    assert json.loads(store["npp/progress/0"])["step"] == 12  # this rank published its own progress
    dog.stop()


def test_steps_and_saves_keep_it_quiet_and_an_evaluation_pauses_it():
    lines, exits = [], []
    dog = ProgressWatchdog(0.3, rank=0, world_size=1, log=lines.append, exit=exits.append, poll_s=0.02)
    dog.start(step=0)
    for step in range(1, 8):  # steps every 0.1 s
        time.sleep(0.1)
        dog.beat(step)
    with dog.pause():  # a 0.6 s evaluation
        time.sleep(0.6)
    time.sleep(0.1)
    assert exits == [] and lines == []
    time.sleep(0.5)  # then nothing: a stall
    assert exits == [STALLED]
    dog.stop()


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_in_bounded_time_and_is_named(shard_set, tmp_path):
    """2 ranks under torchrun, --collective-timeout 10: SIGSTOP rank 1 mid-run (a GPU off the bus, a stuck read).
    Rank 0's watchdog ends rank 0 after the timeout, before the process group's own would, naming rank 1, its
    host and where rank 0 waits; no checkpoint is left half-written (latest names a complete one). What torchrun
    then does (it ends the other ranks after its own teardown timeouts, a stopped one with SIGKILL) is
    torchrun's: done here at once.

    The tracking server takes 12 s to fail rank 0's first request (it accepts and never answers), longer than the
    timeout: start-up is not training, and must not be taken for a stall (CI, on a loaded machine: rank 0 created a
    new MLflow store while rank 1's watchdog counted, and ended the job)."""
    import os
    import signal
    import subprocess

    from npp.pipeline.runs import RunFolder
    from tests.helpers import launch_cmd, read_metrics, run_env, signal_tree

    run = tmp_path / "run"
    silent = socket.socket()  # a tracking server that accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    env = {**run_env(tmp_path), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.getsockname()[1]}",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "12", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.Popen(launch_cmd(shard_set, run, 2, total_steps=5000, ckpt_every=20, log_every=10,
                                       collective_timeout=10, schedule="1:1"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(read_metrics(run)) < 25 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-4000:]  # not ended by a watchdog during start-up
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                text=True).stdout.split()]
        rank = {int(open(f"/proc/{p}/environ").read().split("\0RANK=")[1].split("\0")[0]): p for p in ranks}
        os.kill(rank[1], signal.SIGSTOP)
        t0 = time.time()
        while time.time() - t0 < 60 and os.path.exists(f"/proc/{rank[0]}") and \
                open(f"/proc/{rank[0]}/stat").read().split()[2] != "Z":
            time.sleep(0.2)
        ended = time.time() - t0  # rank 0 left: torchrun (srun --kill-on-bad-exit on SLURM) ends the rest
        # before the process group's own timeout (10 + 60 s) could: the watchdog ended it (its line, below), with
        # room for a loaded machine (a tighter wall-clock bound would fail there, not here)
        assert ended < 60, ended
        signal_tree(proc.pid, signal.SIGKILL)  # torchrun would: here at once, not after its teardown's timeouts
        out, _ = proc.communicate(timeout=60)
    finally:
        silent.close()
        if proc.poll() is None:
            proc.kill()
    assert "MLflow at http://127.0.0.1" in out and "is unreachable" in out  # the slow start happened
    line = next(x for x in out.splitlines() if "no optimizer step or save completed" in x)
    assert line.startswith(f"[npp train] rank 0 on {socket.gethostname()}") and "--collective-timeout 10" in line
    assert f"stopped: rank 1 on {socket.gethostname()}" in line and "Waiting in: " in line and "exiting 3" in line
    folder = RunFolder(run)
    assert folder.latest_tag() in folder.complete_tags()
