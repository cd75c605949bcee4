"""slurm/train.sbatch's signal paths, run as a script on this machine with `srun`/`scontrol` stubbed.

The stubs record their calls (srun runs its command in place, scontrol answers
`show hostnames` and records `requeue`), so what is tested is the script's own logic:
which signal requeues, what it claims about checkpoints. tests/slurm/test_cluster.py runs
the same script under a real SLURM.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import process_tree, read_metrics, signal_job

REPO = Path(__file__).resolve().parents[2]
SRUN = """#!/bin/bash
# stub: drop srun's options, run the command in place
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
echo "$@" >> "$SCONTROL_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi
"""


@pytest.fixture
def sbatch_env(tmp_path, shard_set):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    env = {
        **os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
        "SHARDS": str(shard_set), "OUT": str(tmp_path / "run"), "MODEL": "GPT-Nano", "GLOBAL_BATCH": "16",
        "GPUS_PER_NODE": "2", "WORKERS": "1", "TORCHRUN": str(Path(sys.executable).parent / "torchrun"),
        "NPP": str(Path(sys.executable).parent / "npp"),
        "DS_CONFIG": str(REPO / "ds_configs" / "zero2.json"), "SCHEDULE": "2:0.5,1:0.5", "OMP_NUM_THREADS": "1",
        "EXTRA": "--total-steps 40 --ckpt-every 1000 --log-every 4 --warmup-epochs 0.5 --lr 3e-3 --end-lr 1e-4 "
                 "--shuffle-buffer 20",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1",
    }
    env.pop("SLURM_RESTART_COUNT", None)
    return env


def _start(env, tmp_path):
    return subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_steps(proc, run, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(read_metrics(run)) < n:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]


def _calls(tmp_path):
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_time_limit_warning_saves_requeues_and_the_restart_resumes(sbatch_env, tmp_path):
    run = tmp_path / "run"
    proc = _start(sbatch_env, tmp_path)
    _wait_steps(proc, run, 3)
    proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1@N: the batch shell only
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    last = max(r["step"] for r in read_metrics(run))
    assert last < 40 and (run / "checkpoints" / "latest").read_text() == f"step_{last:09d}"
    assert f"checkpoint saved: step_{last:09d}; requeueing job 4242" in out, out[-3000:]
    assert "requeue 4242" in _calls(tmp_path) and not (run / "STOP").exists()
    # the requeued job
    proc = _start({**sbatch_env, "SLURM_RESTART_COUNT": "1"}, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming at step {last}/40" in out and "training finished; checkpoint saved: step_000000040" in out
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 41))
    assert _calls(tmp_path).count("requeue 4242") == 1


@pytest.mark.slow
def test_term_to_every_process_saves_and_does_not_requeue(sbatch_env, tmp_path):
    run = tmp_path / "run"
    proc = _start(sbatch_env, tmp_path)
    _wait_steps(proc, run, 3)
    signal_job(proc.pid, signal.SIGTERM)  # scancel / preemption: every process of the job
    out, _ = proc.communicate(timeout=180)
    last = max(r["step"] for r in read_metrics(run))
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:09d}"
    assert f"checkpoint saved: step_{last:09d}; not requeueing" in out, out[-3000:]
    assert "requeue 4242" not in _calls(tmp_path)


@pytest.mark.slow
def test_no_checkpoint_is_claimed_when_none_was_written(sbatch_env, tmp_path):
    run = tmp_path / "run"
    proc = _start(sbatch_env, tmp_path)
    _wait_steps(proc, run, 1)
    torchrun = [p for p in process_tree(proc.pid) if p != proc.pid][0]
    signal_job(torchrun, signal.SIGKILL)  # the trainer dies without saving (OOM killer, node failure)
    out, _ = proc.communicate(timeout=120)
    assert "training failed" in out and "no new checkpoint (latest is still none)" in out, out[-3000:]
    assert "checkpoint saved" not in out
    # a failure is requeued (the first of at most 3 in a row), with its line in the run folder
    assert "failure 1 of at most 3 in a row: requeueing job 4242" in out and proc.returncode == 0
    assert "requeue 4242" in _calls(tmp_path) and len((run / "failures.log").read_text().splitlines()) == 1


FAILING_TORCHRUN = """#!/bin/bash
# stub: a trainer that fails at once; with ADVANCE set it first moves the run's latest checkpoint (progress)
out=$(for a in "$@"; do [ "$prev" = --out ] && echo "$a"; prev=$a; done)
if [ -n "$ADVANCE" ]; then mkdir -p "$out/checkpoints/$ADVANCE" && echo "$ADVANCE" > "$out/checkpoints/latest"; fi
exit 1
"""


def test_a_failure_is_requeued_a_bounded_number_of_times_in_a_row(sbatch_env, tmp_path):
    """A trainer that fails every time (exit 1 each start): requeued 3 times, then the job ends with one line naming
    each failure; a start that moved the latest checkpoint resets the count."""
    stub = tmp_path / "stubs" / "torchrun"
    stub.write_text(FAILING_TORCHRUN)
    stub.chmod(0o755)
    env = {**sbatch_env, "TORCHRUN": str(stub)}

    def start(restart, **extra):
        proc = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch")], cwd=tmp_path, capture_output=True,
                              text=True, env={**env, "SLURM_RESTART_COUNT": str(restart), **extra}, timeout=120)
        return proc.returncode, proc.stdout

    for restart in range(3):
        rc, out = start(restart)
        assert rc == 0 and f"failure {restart + 1} of at most 3 in a row: requeueing job 4242" in out, out
    rc, out = start(3)
    assert rc == 1, out
    assert "training failed 4 times in a row without a new checkpoint (MAX_FAILURES=3): not requeued" in out
    assert out.count("exit 1; no new checkpoint") == 4  # each failure named
    assert _calls(tmp_path).count("requeue 4242") == 3
    rc, out = start(0, SLURM_JOB_ID="4343")  # the user submits it again: a new job counts from 1
    assert rc == 0 and "failure 1 of at most 3 in a row: requeueing job 4343" in out, out
    rc, out = start(4, ADVANCE="step_000000010")  # progress before failing: the count starts again
    assert rc == 0 and "failure 1 of at most 3 in a row" in out
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")  # the stub's checkpoint is no real one
    rc, out = start(5, MAX_FAILURES="0")
    assert rc == 1 and "not requeued" in out
