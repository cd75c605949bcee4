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
