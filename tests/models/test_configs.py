import pytest
import torch

from npp.models import GPT, GPT_SIZES, GPTConfig, count_parameters, gpt_config

# Computed from the architecture (vocab 16384, 1000 classes + null), see docs/method.md.
EXPECTED = {
    "GPT-B": 110_888_448,
    "GPT-L": 342_910_976,
    "GPT-XL": 774_699_520,
    "GPT-XXL": 1_410_972_672,
    "GPT-XXXL": 3_893_027_840,
}


@pytest.mark.parametrize("name", sorted(GPT_SIZES))
def test_meta_build_matches_formula(name):
    cfg = gpt_config(name)
    with torch.device("meta"):
        model = GPT(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(cfg)
    if name in EXPECTED:
        assert built == EXPECTED[name]


def test_swiglu_hidden_widths():
    assert [gpt_config(n).ffn_hidden for n in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL")] == [
        2048, 2816, 3584, 4096, 6912,
    ]


def test_llamagen_field_names_accepted_and_unknown_rejected():
    args = dict(dim=64, n_layer=2, n_head=2, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None,
                rope_base=10000, norm_eps=1e-5, initializer_range=0.02, token_dropout_p=0.1, attn_dropout_p=0.0,
                resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0, num_classes=10,
                class_dropout_prob=0.1, vocab_size=128, cls_token_num=1, block_size=64,
                caption_dim=2048, model_type="c2i", max_batch_size=32, max_seq_len=2048)
    cfg = GPTConfig.from_dict(args)
    assert cfg.grid == (8, 8)
    with pytest.raises(ValueError, match="unknown GPTConfig fields.*not_a_field"):
        GPTConfig.from_dict({**args, "not_a_field": 1})


def test_non_square_grid_and_bad_block_size():
    assert GPTConfig(dim=64, n_head=2, n_layer=1, block_size=24 * 16, grid=(24, 16)).grid == (24, 16)
    with pytest.raises(ValueError, match="not a square"):
        GPTConfig(dim=64, n_head=2, n_layer=1, block_size=24 * 16)
    with pytest.raises(ValueError, match="unknown model"):
        gpt_config("GPT-Huge")
