"""Fixtures every test folder uses: a small GPT, a tiny real shard set, a real MLflow server.

Helpers the tests import are in tests/helpers.py."""

import pytest

from tests.helpers import MlflowServer, make_gpt, save_small_vq

# The files that take longest (seconds of test time with `pytest --durations=0`, 2 workers, at c302a13), longest
# first. `make test` hands whole files to its xdist workers in collection order; started last, one of these would
# leave the other workers idle at the end. The order changes only how long the suite takes, never a result.
LONGEST_FILES = (
    "tests/slurm/test_two_nodes.py",  # 313
    "tests/train/test_preemption.py",  # 246
    "tests/train/test_ema.py",  # 176 (the first JIT build of DeepSpeed's cpu_adam op)
    "tests/test_demo.py",  # 162
    "tests/eval/test_during_training.py",  # 130
    "tests/train/test_tracking.py",  # 112
    "tests/test_gpu_check.py",  # 107
    "tests/slurm/test_sample_jobs.py",  # 91
    "tests/slurm/test_cluster.py",  # 90
    "tests/slurm/test_sbatch_stubbed.py",  # 82
    "tests/train/test_disk_full.py",  # 76
    "tests/train/test_compiled_step.py",  # 12 warm, 123 with a cold inductor cache (CI)
)


def pytest_collection_modifyitems(items):
    """The longest files first (LONGEST_FILES), every other file after them in its usual order."""
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture
def gpt():
    return make_gpt()


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory):
    """Toy images -> untrained small VQ -> shards: 80 samples in 8 shards, vocab 64, 8x8 grid."""
    from npp.pipeline.toy import write_toy_dataset
    from npp.tokenize.run import TokenizeConfig, tokenize

    root = tmp_path_factory.mktemp("train_data")
    write_toy_dataset(str(root / "images"), per_class=8, size=32)
    save_small_vq(root / "vq.pt")
    tokenize(TokenizeConfig(data=str(root / "images"), vq=str(root / "vq.pt"), out=str(root / "shards"),
                            image_size=32, samples_per_shard=10, batch=32, workers=0).plan())
    return root / "shards"  # 80 samples in 8 shards, vocab 64, 8x8 grid


@pytest.fixture(scope="session")
def heldout_shard_set(tmp_path_factory):
    """The shard_set's inputs with a tenth held out (--val-share 0.1): 72 training samples in 8 shards, 8 in one
    val shard."""
    from npp.pipeline.toy import write_toy_dataset
    from npp.tokenize.run import TokenizeConfig, tokenize

    root = tmp_path_factory.mktemp("heldout_data")
    write_toy_dataset(str(root / "images"), per_class=8, size=32)
    save_small_vq(root / "vq.pt")
    tokenize(TokenizeConfig(data=str(root / "images"), vq=str(root / "vq.pt"), out=str(root / "shards"),
                            image_size=32, samples_per_shard=10, batch=32, workers=0, val_share=0.1).plan())
    return root / "shards"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store in tmp), ended when the test ends; its URL."""
    (tmp_path / "mlflow_server").mkdir()
    server = MlflowServer(tmp_path / "mlflow_server").start()
    yield server
    server.stop()
