import pytest
import torch
import torch.nn.functional as F

from npp.models.gpt import GPT, patch_loss, rope_2d
from npp.models.patches import group_patches, patch_targets
from tests.helpers import make_gpt


def test_grouping_order_on_hand_made_grid():
    tokens = torch.arange(16).view(1, 16)  # 4x4 grid, raster order
    got = group_patches(tokens, (4, 4), 2)[0].tolist()
    assert got == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # non-square 2x4 grid, k=2: two patches side by side
    assert group_patches(torch.arange(8).view(1, 8), (2, 4), 2)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_patch_input_is_class_token_then_mean_of_patch_embeddings(gpt):
    idx = torch.randint(0, 64, (2, 64))
    labels = torch.tensor([1, 3])
    seen = {}

    def capture(module, args):
        seen["h"] = args[0].clone()

    hook = gpt.layers[0].register_forward_pre_hook(capture)
    gpt(idx, labels, targets=idx, patch=2)
    hook.remove()
    emb = gpt.tok_embeddings.weight[idx].view(2, 4, 2, 4, 2, -1)  # (B, prow, k, pcol, k, D)
    means = emb.mean(dim=(2, 4)).reshape(2, 16, -1)
    expected = torch.cat([gpt.cls_embedding.embedding_table.weight[labels][:, None], means[:, :-1]], dim=1)
    torch.testing.assert_close(seen["h"], expected)


def test_patch_loss_equals_explicit_loop(gpt):
    idx = torch.randint(0, 64, (3, 64))
    labels = torch.tensor([0, 2, 4])
    for k in (2, 4, 8):
        logits, loss = gpt(idx, labels, targets=idx, patch=k)
        targets = patch_targets(idx, (8, 8), k)
        terms = []
        for b in range(3):
            for j in range(logits.shape[1]):
                for t in targets[b, j].tolist():
                    terms.append(F.cross_entropy(logits[b, j][None], torch.tensor([t])))
        torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_k1_is_plain_next_token_prediction(gpt):
    idx = torch.randint(0, 64, (2, 64))
    labels = torch.tensor([1, 0])
    logits, loss = gpt(idx, labels, targets=idx, patch=1)
    assert logits.shape == (2, 64, 64)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), idx.reshape(-1)))
    ntp_logits, none = gpt(idx, labels)  # next-token logits without targets: same positions
    assert none is None
    torch.testing.assert_close(ntp_logits, logits)


def test_patch_loss_never_repeats_logits():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    targets = torch.randint(0, 10, (2, 4, 16))
    loss = patch_loss(logits, targets)
    loss.backward()
    repeated = F.cross_entropy(logits.detach()[:, :, None].expand(-1, -1, 16, -1).reshape(-1, 10), targets.reshape(-1))
    torch.testing.assert_close(loss.detach(), repeated)
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradients_reach_every_input_token_embedding(k):
    model = make_gpt(vocab=64)
    model.train()
    for m in model.modules():  # dropout would zero some paths at random
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    idx = torch.arange(64).view(1, 64)  # every token id once, so rows map to positions
    _, loss = model(idx, torch.tensor([1]), targets=idx, patch=k)
    loss.backward()
    grad_rows = model.tok_embeddings.weight.grad.abs().sum(dim=1) > 0
    last_patch = set(patch_targets(idx, (8, 8), k)[0, -1].tolist())
    for token in range(64):
        # the last patch is never an input: nothing follows it to predict
        assert bool(grad_rows[token]) == (token not in last_patch), token


def test_384px_grid_24x24():
    model = make_gpt(grid=(24, 24), vocab=32)
    idx = torch.randint(0, 32, (2, 576))
    labels = torch.tensor([0, 1])
    for k, positions in ((1, 576), (2, 144), (4, 36), (8, 9)):
        logits, loss = model(idx, labels, targets=idx, patch=k)
        assert logits.shape == (2, positions, 32)
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="24x24"):
        model(idx, labels, targets=idx, patch=5)


def test_k_not_dividing_grid_raises_value_error_naming_grid(gpt):
    idx = torch.randint(0, 64, (1, 64))
    with pytest.raises(ValueError, match="8x8"):
        gpt(idx, torch.tensor([0]), targets=idx, patch=3)


def test_eval_mode_is_deterministic_and_train_mode_drops():
    model = make_gpt(class_dropout_prob=0.5, token_dropout_p=0.5)
    idx = torch.randint(0, 64, (8, 64))
    labels = torch.arange(8) % 5
    a, _ = model(idx, labels, targets=idx, patch=2)
    b, _ = model(idx, labels, targets=idx, patch=2)
    torch.testing.assert_close(a, b)
    model.train()
    c, _ = model(idx, labels, targets=idx, patch=2)
    assert not torch.allclose(a, c)


def test_rope_2d_layout():
    table = rope_2d(2, 3, head_dim=16, base=10000)
    assert table.shape == (1 + 6, 8, 2)
    assert torch.all(table[0] == 0)  # class token slot: cos = sin = 0
    # position (row 1, col 2) = index 1 + 1*3 + 2; first 4 pairs turn with the row, last 4 with the column
    angles = torch.atan2(table[1 + 5, :, 1], table[1 + 5, :, 0])
    inv = 1.0 / (10000 ** (torch.arange(4) * 2 / 8))
    torch.testing.assert_close(angles[:4], 1 * inv)
    torch.testing.assert_close(angles[4:], 2 * inv)


def test_gqa_and_drop_path_build_and_train():
    model = make_gpt(n_kv_head=1, drop_path_rate=0.1)
    model.train()
    idx = torch.randint(0, 64, (2, 64))
    _, loss = model(idx, torch.tensor([0, 1]), targets=idx, patch=2)
    loss.backward()
    assert model.layers[0].attention.wqkv.weight.shape == ((2 + 2 * 1) * 32, 64)


def test_state_dict_names_are_llamagen(gpt):
    names = set(gpt.state_dict())
    expected = {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.{n}.weight" for n in (
            "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
            "attention_norm", "ffn_norm")}
    assert names == expected
    assert gpt.cls_embedding.embedding_table.weight.shape[0] == 5 + 1  # null class row


def test_zero_initialised_head_gives_uniform_loss():
    model = make_gpt(random_head=False)
    idx = torch.randint(0, 64, (2, 64))
    _, loss = model(idx, torch.tensor([0, 1]), targets=idx, patch=4)
    torch.testing.assert_close(loss, torch.log(torch.tensor(64.0)))
    assert isinstance(model, GPT)
