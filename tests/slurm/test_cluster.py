"""slurm/*.sbatch submitted to a real single-node SLURM cluster (CPU, GPT-Nano), from a fresh copy of the
repository: with a bare `sbatch` as SLURM users submit scripts, and through `make *-slurm`.

The interruptions of training (the time-limit USR1, `scontrol requeue`, `scancel`) run on two nodes, in
tests/slurm/test_two_nodes.py, which guards everything the one-node versions did and the multi-node path
besides; sampling jobs run on both clusters (tests/slurm/test_sample_jobs.py).

Each test drives SLURM the way a user or the cluster does (sbatch, scancel, scontrol
requeue, the time-limit USR1) and checks what the job did from its log, the run
directory and MLflow. A requeued job waits for a begin time (~2 min on Slurm 22.05);
the tests release it after 3 s with `scontrol update StartTime=now`, which changes when
it starts, not what it does.
"""

import os
import time
from pathlib import Path

import pytest

from npp.tokenize.run import TokenizeConfig, tokenize
from tests.helpers import save_small_vq
from tests.slurm.jobs import (
    INSTRUMENT,
    assert_each_step_once,
    job_env,
    job_log,
    make,
    mlflow_runs_and_loss_steps,
    sbatch,
    submit_train,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_train_slurm_runs_from_a_fresh_checkout_despite_a_stale_op_lock(checkout, slurm_cluster, tmp_path, shard_set):
    """make train-slurm from a fresh copy; a JIT-op lock left by a killed start must not hang it."""
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"  # where torch puts it under TORCH_EXTENSIONS_DIR
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    run = tmp_path / "run"
    job = submit_train(checkout, slurm_cluster, tmp_path, shard_set, run, via_make=True, TORCH_EXTENSIONS_DIR=str(ext))
    info = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400)
    log = job_log(checkout, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert (run / "model.pt").exists() and "training finished; checkpoint saved: step_000000040" in log
    assert_each_step_once(run)
    n_runs, steps = mlflow_runs_and_loss_steps(tmp_path, run)
    assert n_runs == 1 and steps == list(range(4, 41, 4))


@pytest.fixture(scope="module")
def tokenize_inputs(tmp_path_factory):
    from npp.pipeline.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("tok")
    write_toy_dataset(str(root / "images"), per_class=120, size=40)
    save_small_vq(root / "vq.pt")
    ref = root / "reference"
    tokenize(TokenizeConfig(data=str(root / "images"), vq=str(root / "vq.pt"), out=str(ref), image_size=32,
                            samples_per_shard=25, batch=4, workers=0).plan())
    return root


def _tokenize_array(checkout, slurm_cluster, tmp_path, root, out, via_make=True):
    settings = dict(DATA=root / "images", VQ=root / "vq.pt", OUT=out, IMAGE_SIZE=32, SAMPLES_PER_SHARD=25)
    slow = {"PYTHONPATH": str(INSTRUMENT), "NPP_TEST_SHARD_DELAY": "0.5"}  # a cancel lands midway on any machine
    if via_make:
        return make(checkout, slurm_cluster, "tokenize-slurm", job_env(tmp_path, slurm_cluster, **slow), **settings,
                    TOKENIZE_FLAGS="--views 2 --batch 2", ARRAY="0-1", SBATCH_FLAGS="--gres=none --cpus-per-task=1")
    env = job_env(tmp_path, slurm_cluster, EXTRA="--views 2 --batch 2", **slow,
                  **{k: str(v) for k, v in settings.items()})
    return sbatch(
        checkout, slurm_cluster, env, "--array=0-1", "--gres=none", "--cpus-per-task=1", "slurm/tokenize.sbatch"
    )


def _wait_array(slurm_cluster, job, timeout=300):
    wait_for(lambda: not slurm_cluster.run("squeue", "-h", "-j", job).stdout.strip(), timeout, f"array {job}")


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("train-*.tar"))}


def test_tokenize_array_equals_one_process_and_resumes_after_a_cancelled_task(checkout, slurm_cluster, tmp_path,
                                                                             tokenize_inputs):
    root = tokenize_inputs
    reference = _shard_bytes(root / "reference")
    out = tmp_path / "shards"
    job = _tokenize_array(checkout, slurm_cluster, tmp_path, root, out, via_make=False)  # a bare sbatch
    _wait_array(slurm_cluster, job)
    assert (out / "manifest.parquet").exists(), (checkout / "logs").iterdir()
    assert _shard_bytes(out) == reference
    # cancel task 1 while it runs, rerun the array: it completes to the same bytes
    out2 = tmp_path / "shards2"
    job = _tokenize_array(checkout, slurm_cluster, tmp_path, root, out2)
    wait_for(lambda: slurm_cluster.job_state(f"{job}_1").get("JobState") == "RUNNING", 120, "task 1 to run")
    wait_for(lambda: any(out2.glob("train-*.tar")), 120, "a first shard")
    slurm_cluster.run("scancel", f"{job}_1", check=True)
    _wait_array(slurm_cluster, job)
    assert slurm_cluster.job_state(f"{job}_1")["JobState"] == "CANCELLED"
    assert not (out2 / "manifest.parquet").exists(), "task 1 finished before it could be cancelled"
    job = _tokenize_array(checkout, slurm_cluster, tmp_path, root, out2)
    _wait_array(slurm_cluster, job)
    assert (out2 / "manifest.parquet").exists() and _shard_bytes(out2) == reference
