import argparse

import pytest
import torch

from npp.models.checkpoint import CheckpointMismatchError, infer_gpt_config, load_gpt, read_checkpoint
from tests.helpers import make_gpt


def _same_outputs(a, b):
    idx = torch.randint(0, 64, (2, 64))
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(a(idx, labels, targets=idx, patch=2)[0], b(idx, labels, targets=idx, patch=2)[0])


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_llamagen_style_checkpoint_loads_without_config(tmp_path, prefix):
    model = make_gpt()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "c2i.pt"
    # Official files carry an argparse Namespace under "args": weights_only must still read them.
    torch.save({"model": state, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-Nano")}, path)
    loaded, ckpt = load_gpt(path, block_size=64)
    assert ckpt["steps"] == 10
    assert loaded.config.n_head == 2 and loaded.config.num_classes == 5 and loaded.config.vocab_size == 64
    _same_outputs(model, loaded.eval())


def test_our_checkpoint_with_config_and_ema(tmp_path):
    model = make_gpt()
    ema = make_gpt(seed=1)
    path = tmp_path / "ours.pt"
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "config": model.config.to_dict(), "steps": 5}, path
    )
    loaded, _ = load_gpt(path, use_ema=True)
    _same_outputs(ema, loaded.eval())


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    model = make_gpt()
    state = model.state_dict()
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["output.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad.pt"
    torch.save({"model": state, "config": model.config.to_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_gpt(path)
    msg = str(err.value)
    assert "missing (1): norm.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "output.weight: checkpoint (10, 64) vs model (64, 64)" in msg
    assert str(path) in msg


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt is not a readable"):
        read_checkpoint(bad)


def test_infer_config_of_gpt_b_shapes():
    from npp.models import GPT, gpt_config

    with torch.device("meta"):
        state = GPT(gpt_config("GPT-B")).state_dict()
    cfg = infer_gpt_config(state)
    assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.ffn_hidden, cfg.num_classes) == (12, 12, 768, 2048, 1000)
