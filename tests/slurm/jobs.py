"""What the SLURM tests share: a fresh checkout, submitting jobs as users do (bare sbatch or make, from the
cluster's login node), waiting on SLURM, reading a job's log, its run folder and MLflow."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.helpers import read_metrics

REPO = Path(__file__).resolve().parents[2]
TRAIN = ("--total-steps 40 --ckpt-every 8 --log-every 4 --warmup-epochs 0.5 --lr 3e-3 --end-lr 1e-4 "
         "--shuffle-buffer 20")
SBATCH = "--gres=none --cpus-per-task=2 --nodes=1"
INSTRUMENT = Path(__file__).resolve().parent / "instrument"  # sitecustomize: what a job did, seen by a test


def fresh_checkout(dest: Path) -> Path:
    """A fresh copy of the repository's files (what a clone has, logs/ with its .gitkeep only), sharing .venv."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)  # mtimes kept: make sees the set-up stamp as current
    (dest / ".venv").symlink_to(REPO / ".venv")
    assert [p.name for p in (dest / "logs").iterdir()] == [".gitkeep"]
    return dest


def make(checkout, cluster, target, env, **variables):
    # -o: the copy shares the repository's .venv; never let make re-run `setup` there (it would point the shared
    # editable install at this temporary copy)
    args = cluster.client("make", "-C", str(checkout), "-o", ".venv/.npp-setup-stamp", target,
                          *[f"{k}={v}" for k, v in variables.items()])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)


# what a process of an in-process test leaves behind, never in a user's login shell
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env(tmp_path, slurm_cluster, **extra):
    shell = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    return {**shell, **slurm_cluster.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "GPUS_PER_NODE": "2", "WORKERS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TQDM_MININTERVAL": "5", **extra}


def sbatch(checkout, cluster, env, *args):
    """A bare `sbatch` from the repository's root, as SLURM users submit a script."""
    proc = subprocess.run(cluster.client("sbatch", *args), cwd=checkout, capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)


def submit_train(checkout, slurm_cluster, tmp_path, shard_set, run, via_make=False, sbatch_flags=None, more_flags="",
                 **extra):
    if via_make:
        return make(
            checkout,
            slurm_cluster,
            "train-slurm",
            job_env(tmp_path, slurm_cluster, **extra),
            SHARDS=shard_set,
            RUN=run,
            MODEL="GPT-Nano",
            SCHEDULE="2:0.5,1:0.5",
            GLOBAL_BATCH=16,
            TRAIN_FLAGS=f"{TRAIN} {more_flags}".strip(),
            SBATCH_FLAGS=SBATCH,
        )
    env = job_env(tmp_path, slurm_cluster, SHARDS=str(shard_set), OUT=str(run), MODEL="GPT-Nano",
                  SCHEDULE="2:0.5,1:0.5", GLOBAL_BATCH="16", EXTRA=f"{TRAIN} {more_flags}".strip(), **extra)
    return sbatch(checkout, slurm_cluster, env, *(sbatch_flags or SBATCH).split(), "slurm/train.sbatch")


def job_log(checkout, job):
    path = checkout / "logs" / f"npp-train_{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(cond, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def release_requeued(slurm_cluster, job, restarts):
    """Wait until the job is pending again after `restarts` restarts, then let it start now."""
    wait_for(lambda: int(slurm_cluster.job_state(job).get("Restarts", 0)) >= restarts
             and slurm_cluster.job_state(job).get("JobState") == "PENDING", 180, f"job {job} to be requeued")
    # Not at once: slurmd revokes the old incarnation's credential with a 1-second clock, and a restart
    # launched within that second is refused ("Job credential revoked"), which SLURM's own begin-time
    # delay after a requeue never risks.
    time.sleep(3)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def interrupt_and_resume(checkout, slurm_cluster, tmp_path, shard_set, run, command: list[str], **submit):
    """Submit a training job, interrupt it at step 10 with `command JOB`, let the requeued job run to the end."""
    job = submit_train(checkout, slurm_cluster, tmp_path, shard_set, run, **submit)
    wait_for(lambda: len(read_metrics(run)) >= 10, 300, "training to reach step 10")
    slurm_cluster.run(*command, job, check=True)
    release_requeued(slurm_cluster, job, 1)
    info = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED"), 400)
    log = job_log(checkout, job)
    assert info["JobState"] == "COMPLETED", f"{log[-3000:]}\n{info}\n{slurm_cluster.logs()[-4000:]}"
    return info, log


def mlflow_runs_and_loss_steps(tmp_path, run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = [m.step for m in client.get_metric_history((run / "mlflow_run_id").read_text(), "Results/loss")]
    return len(runs), steps


def assert_each_step_once(run, total=40):
    assert [r["step"] for r in read_metrics(run)] == list(range(1, total + 1))


