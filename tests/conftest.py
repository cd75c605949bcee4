"""Fixtures every test folder uses: a small GPT, a tiny real shard set, a real MLflow server.

Helpers the tests import are in tests/helpers.py."""

import pytest

from tests.helpers import MlflowServer, make_gpt, save_small_vq


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
                            image_size=32, samples_per_shard=10, batch=32, workers=0))
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
                            image_size=32, samples_per_shard=10, batch=32, workers=0, val_share=0.1))
    return root / "shards"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store in tmp), ended when the test ends; its URL."""
    (tmp_path / "mlflow_server").mkdir()
    server = MlflowServer(tmp_path / "mlflow_server").start()
    yield server
    server.stop()
