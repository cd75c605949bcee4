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
