import torch

from npp.models.checkpoint import load_vq
from npp.tokenize.config import FitVQConfig
from npp.tokenize.fit_vq import fit_vq


def test_fit_vq_writes_a_loadable_llamagen_checkpoint_and_a_png(toy_tree, tmp_path):
    out = tmp_path / "vq.pt"
    stats = fit_vq(FitVQConfig(str(toy_tree), str(out), image_size=32, max_steps=6, batch=8, minutes=1))
    assert stats["steps"] == 6
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "config"} and "quantize.codebook_used" in ckpt["model"]
    vq, _ = load_vq(out)
    assert vq.encode_codes(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8)
    assert out.with_suffix(".png").stat().st_size > 0


def test_fitting_lowers_reconstruction_error(toy_tree, tmp_path):
    short = fit_vq(FitVQConfig(str(toy_tree), str(tmp_path / "a.pt"), image_size=32, max_steps=1, batch=16, seed=0))
    longer = fit_vq(FitVQConfig(str(toy_tree), str(tmp_path / "b.pt"), image_size=32, max_steps=60, batch=16, seed=0))
    assert longer["recon_mse"] < 0.7 * short["recon_mse"]


def test_the_budget_is_steps_not_wall_clock(toy_tree, tmp_path, monkeypatch):
    """On a machine 1000x slower (each clock read 10 s later) the tokenizer is the same: all its steps run."""
    import itertools

    from npp.tokenize import fit_vq as fit_vq_module

    clock = itertools.count(0, 10.0)
    monkeypatch.setattr(fit_vq_module.time, "time", lambda: next(clock))
    stats = fit_vq(FitVQConfig(str(toy_tree), str(tmp_path / "slow.pt"), image_size=32, max_steps=8, batch=8))
    assert stats["steps"] == 8
