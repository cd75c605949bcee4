"""Preemption as a cluster does it: every process of the job is killed or signalled, dropout stays on.

torchrun starts each rank in its own session, and each rank's loader workers are
processes too, so "the job" is the whole process tree; these tests kill or signal all
of it (frozen first, so nothing slips between listing and signalling), the way SLURM
does, or only the launcher, the way `kill <torchrun pid>` does.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import launch, launch_cmd, read_metrics, run_env, signal_job

# default dropout (0.1) on, 2 ranks x 1 loader worker, a stage switch at step 12
RUN = dict(total_steps=24, ckpt_every=5, log_every=4, schedule="2:0.5,1:0.5")


def _mlflow_steps(tmp_path, run_id, key="Results/loss"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, key)]


def _start(shard_set, run, tmp_path, nproc=2, **overrides):
    return subprocess.Popen(launch_cmd(shard_set, run, nproc, **{**RUN, **overrides}), env=run_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, cond, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not cond():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stdout.read()[-2000:]


@pytest.fixture(scope="module")
def reference(shard_set, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    launch(shard_set, tmp / "run", tmp, **RUN)
    return {r["step"]: r for r in read_metrics(tmp / "run")}


def _assert_each_step_once_and_equal(run, reference, total):
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, total + 1)), "a step is missing or written twice"
    for r in records:
        ref = reference[r["step"]]
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6), r["step"]
        assert r["lr"] == pytest.approx(ref["lr"]) and r["patch_side"] == ref["patch_side"]


@pytest.mark.slow
def test_kill_9_of_every_process_then_resume_is_exact(shard_set, tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(shard_set, run, tmp_path)
    latest = run / "checkpoints" / "latest"
    _wait(proc, lambda: latest.exists() and latest.read_text().strip() >= "step_000000010")
    pids = signal_job(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(pids) >= 5  # launcher, 2 ranks, their loader workers
    time.sleep(0.5)
    assert not [
        p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split(")")[-1][:3]
    ]
    killed_at = max(r["step"] for r in read_metrics(run))
    assert 10 <= killed_at < RUN["total_steps"], "the kill must interrupt the ranks between checkpoints"
    # the checkpoint `latest` names once every process is dead (10, or a later one on a loaded machine)
    saved = int(latest.read_text().strip().removeprefix("step_"))
    run_id = (run / "mlflow_run_id").read_text()
    log = launch(shard_set, run, tmp_path, **RUN)
    assert f"resuming at step {saved}/24" in log and saved >= 10
    _assert_each_step_once_and_equal(run, reference, RUN["total_steps"])
    assert (run / "mlflow_run_id").read_text() == run_id
    steps = _mlflow_steps(tmp_path, run_id)
    assert steps == sorted(set(steps)) and steps[-1] == RUN["total_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "every process"])
def test_sigterm_saves_at_the_step_reached_and_the_rerun_resumes(shard_set, tmp_path, reference, target):
    run = tmp_path / "run"
    proc = _start(shard_set, run, tmp_path, ckpt_every=1000)
    _wait(proc, lambda: len(read_metrics(run)) >= 3)
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)  # torchrun relays it to each rank's process group, workers included
    else:
        signal_job(proc.pid, signal.SIGTERM)  # SLURM: preemption, scancel, the time limit
    out, _ = proc.communicate(timeout=180)
    assert "stop requested (signal SIGTERM)" in out, out[-3000:]
    assert "is killed by signal" not in out and "ChildFailedError" not in out, out[-3000:]
    last = max(r["step"] for r in read_metrics(run))
    assert last < RUN["total_steps"]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:09d}"
    run_id = (run / "mlflow_run_id").read_text()
    log = launch(shard_set, run, tmp_path, **{**RUN, "ckpt_every": 1000})
    assert f"resuming at step {last}/24" in log
    _assert_each_step_once_and_equal(run, reference, RUN["total_steps"])
    steps = _mlflow_steps(tmp_path, run_id)
    assert steps == sorted(set(steps)) and steps[-1] == RUN["total_steps"]


@pytest.mark.slow
def test_stop_file_and_sigusr1_stops_are_consumed(shard_set, tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(shard_set, run, tmp_path, ckpt_every=1000)
    _wait(proc, lambda: len(read_metrics(run)) >= 2)
    (run / "STOP").write_text("")  # what slurm/train.sbatch's USR1 trap writes
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    first = max(r["step"] for r in read_metrics(run))
    assert f"saved step {first}" in out and not (run / "STOP").exists()
    # the rerun trains on (a STOP left behind would stop it after one step), then USR1 to the ranks stops it
    proc = _start(shard_set, run, tmp_path, ckpt_every=1000)
    _wait(proc, lambda: max((r["step"] for r in read_metrics(run)), default=0) >= first + 3)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in ranks:
        os.kill(int(pid), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "stop requested (signal SIGUSR1)" in out, out[-3000:]
    second = max(r["step"] for r in read_metrics(run))
    assert first + 3 <= second < RUN["total_steps"]
    launch(shard_set, run, tmp_path, **{**RUN, "ckpt_every": 1000})
    _assert_each_step_once_and_equal(run, reference, RUN["total_steps"])


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_through_a_universal_checkpoint(shard_set, tmp_path, reference, before, after):
    run = tmp_path / "run"
    proc = _start(shard_set, run, tmp_path, ckpt_every=1000, nproc=before)
    _wait(proc, lambda: len(read_metrics(run)) >= 6)
    (run / "STOP").write_text("")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(r["step"] for r in read_metrics(run))
    # the ZeRO checkpoint is refused on another world size, before any work, with the way out
    refused = subprocess.run(launch_cmd(shard_set, run, nproc=after, **RUN), env=run_env(tmp_path),
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and f"npp train convert --run {run}" in refused.stdout + refused.stderr
    conv = subprocess.run([sys.executable, "-m", "npp", "train", "convert", "--run", str(run)],
                          env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    log = launch(shard_set, run, tmp_path, nproc=after, **RUN)
    assert f"resuming at step {stopped}/24" in log and "data layout changed" in log
    assert f"continuing at sample {stopped * 16} " in log  # data order 2: where the 16-sample steps left off
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 25))
    resumed = [r for r in records if r["step"] > stopped]
    for r in records:  # the LR schedule continues exactly; before the stop, the run is the reference
        assert r["lr"] == pytest.approx(reference[r["step"]]["lr"])
        if r["step"] <= stopped and before == 2:  # the reference ran on 2 ranks
            assert r["loss"] == pytest.approx(reference[r["step"]]["loss"], rel=1e-6, abs=1e-6)
    # the weights and moments came back: no jump back towards the initial ln(64) = 4.16, the curve goes on
    assert abs(resumed[0]["loss"] - reference[stopped]["loss"]) < 0.2, (resumed[0], reference[stopped])
    mean_run = sum(r["loss"] for r in resumed) / len(resumed)
    mean_ref = sum(reference[r["step"]]["loss"] for r in resumed) / len(resumed)
    assert abs(mean_run - mean_ref) < 0.06, (mean_run, mean_ref)
