"""Shared test helpers: small models built on CPU with deterministic weights."""

import pytest
import torch

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


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store in a folder; stop() and start() again on the same
    port and store (a tracking server restarted for maintenance)."""

    def __init__(self, root):
        from npp.pipeline.ranks import free_port

        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{self.root}/server.db", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not start in {timeout:.0f} s")

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the whole server: gunicorn/uvicorn workers too
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            self.proc = None

    def get(self, path, **params):
        import json
        import urllib.parse
        import urllib.request

        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
            return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store in tmp), ended when the test ends; its URL."""
    (tmp_path / "mlflow_server").mkdir()
    server = MlflowServer(tmp_path / "mlflow_server").start()
    yield server
    server.stop()
