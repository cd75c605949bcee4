import pytest
import torch

from npp.models.checkpoint import CheckpointMismatchError, load_vq
from npp.models.vq import VQModel, vq_config


def small_vq(**kw):
    torch.manual_seed(0)
    # ch=32 with 32 groups: LlamaGen's norm layout, so the config is inferable from shapes alone
    return VQModel(vq_config("VQ-toy", ch=32, norm_groups=32, codebook_size=64, **kw)).eval()


def test_vq16_architecture_size_and_names():
    with torch.device("meta"):
        vq = VQModel(vq_config("VQ-16"))
    assert sum(p.numel() for p in vq.parameters()) == 71_883_403
    names = set(vq.state_dict())
    for n in (
        "quantize.codebook_used",
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.conv_blocks.4.attn.1.proj_out.weight",
        "encoder.mid.1.q.weight",
        "decoder.conv_blocks.0.attn.2.k.weight",
        "decoder.conv_blocks.3.upsample.conv.weight",
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight",
        "decoder.norm_out.weight",
        "encoder.conv_out.weight",
    ):
        assert n in names, n
    assert vq.state_dict()["quantize.codebook_used"].shape == (65536,)


def test_encode_decode_shapes_and_codes_are_nearest_cosine():
    vq = small_vq()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = vq.encode_codes(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    z = torch.nn.functional.normalize(vq.quant_conv(vq.encoder(x)), dim=1).permute(0, 2, 3, 1)
    book = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=1)
    assert torch.equal(codes, (z @ book.t()).argmax(-1))
    img = vq.decode_codes(codes)
    assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1


def test_llamagen_format_round_trip_without_config(tmp_path):
    vq = small_vq()
    path = tmp_path / "vq.pt"
    torch.save({"model": vq.state_dict()}, path)  # LlamaGen writes only the weights
    loaded, _ = load_vq(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode_codes(x), vq.encode_codes(x))
    torch.testing.assert_close(loaded.decode_codes(vq.encode_codes(x)), vq.decode_codes(vq.encode_codes(x)))


def test_not_a_vq_checkpoint_is_named(tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointMismatchError, match="gpt.pt.*not a VQ tokenizer"):
        load_vq(path)
    vq = small_vq()
    state = vq.state_dict()
    state.pop("quantize.codebook_used")
    torch.save({"model": state, "config": vq.config.to_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match="missing \\(1\\): quantize.codebook_used"):
        load_vq(path)
