"""Sampling and evaluation as SLURM jobs (slurm/sample.sbatch), on the one-node and the two-node clusters:
an interrupted job (the time-limit USR1) keeps its pieces, requeues itself and resumes; the merged samples
equal an uninterrupted run's, every class count is right, and the metrics land in the training run.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.slurm.jobs import INSTRUMENT, job_env, release_requeued, sbatch, wait_for

pytestmark = pytest.mark.slow
PER_CLASS, BATCH = 6, 2  # 10 classes: 60 samples in 30 pieces


@pytest.fixture(scope="session")
def trained(shard_set, tmp_path_factory):
    """A GPT-Nano run trained and exported by `npp train` (MLflow in its folder), the toy classifier and the
    reference statistics of the toy images."""
    from npp.eval.config import FitClassifierConfig
    from npp.eval.features import load_feature_net
    from npp.eval.fit_classifier import fit_classifier
    from npp.eval.reference import make_reference, real_images

    root = tmp_path_factory.mktemp("trained")
    data = shard_set.parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "RANK": "0", "WORLD_SIZE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "npp", "train", "--shards", str(shard_set), "--out", str(root / "run"),
                           "--model", "GPT-Nano", "--global-batch", "16", "--total-steps", "10", "--workers", "1",
                           "--schedule", "1:1", "--log-every", "5"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    fit_classifier(FitClassifierConfig(str(data / "images"), str(root / "toynet.pt"), epochs=1, batch=16))
    images, _ = real_images(str(data / "images"), None, 32)
    make_reference(load_feature_net(classifier=str(root / "toynet.pt")), images, str(root / "ref.npz"))
    flags = ["--ckpt", str(root / "run" / "model.pt"), "--vq", str(data / "vq.pt"), "--per-class", str(PER_CLASS),
             "--batch", str(BATCH), "--cfg-scale", "2.0"]
    proc = subprocess.run([sys.executable, "-m", "npp", "sample", *flags, "--out", str(root / "uninterrupted")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, flags


# On the two-node cluster only: its job is the one-node job's path and more (two nodes' pieces, srun across
# nodes); the one-node cluster's sbatch path is what tests/slurm/test_cluster.py runs.
@pytest.mark.parametrize("nodes", [2])
def test_an_interrupted_sampling_job_resumes_to_the_same_samples_and_is_evaluated(request, checkout, tmp_path,
                                                                                  trained, nodes):
    cluster = request.getfixturevalue("slurm_cluster" if nodes == 1 else "two_node_cluster")
    root, flags = trained
    out = tmp_path / "samples"
    env = job_env(tmp_path, cluster, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", PYTHONPATH=str(INSTRUMENT),
                  NPP_TEST_PIECE_DELAY="0.5", NPP_TEST_RECORD=str(tmp_path),
                  SAMPLE_ARGS=" ".join([*flags, "--out", str(out)]),
                  EVAL_ARGS=f"--ref {root / 'ref.npz'} --classifier {root / 'toynet.pt'} --ckpt {flags[1]}")
    job = sbatch(checkout, cluster, env, "--gres=none", "--cpus-per-task=2", f"--nodes={nodes}",
                 "slurm/sample.sbatch")
    pieces = lambda: len(list(out.glob("cfg2/piece_*.npz")))  # noqa: E731
    wait_for(lambda: pieces() >= 4, 300, "the first pieces")
    cluster.run("scancel", "--signal=USR1", "--batch", job, check=True)
    release_requeued(cluster, job, 1)
    info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), 400)
    log = (checkout / "logs" / f"npp-sample_{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{log[-4000:]}\n{info}"
    assert "USR1 (time limit near): requeueing" in log
    kept = int(re.search(r"restart 1 on \S+: (\d+) pieces already", log).group(1))
    assert 4 <= kept < 30, log[-3000:]  # resumed midway: what the first start made was kept
    got = np.load(out / "samples_cfg2.npz")
    want = np.load(root / "uninterrupted" / "samples_cfg2.npz")
    assert np.array_equal(got["arr_0"], want["arr_0"]) and np.array_equal(got["labels"], want["labels"])
    assert np.bincount(got["labels"]).tolist() == [PER_CLASS] * 10
    assert "evaluation finished" in log, log[-3000:]
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = (root / "run" / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    assert any(k.startswith("Results/fid") for k in metrics), sorted(metrics)  # the results open its charts
