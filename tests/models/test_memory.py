"""What a training step keeps for backward: activation checkpointing, and no pinned fused q|k|v buffer."""

import torch

from tests.helpers import make_gpt


def _grads(model, idx, labels, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    _, loss = model(idx, labels, targets=idx, patch=2)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients_with_dropout_on():
    model = make_gpt(token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, attn_dropout_p=0.1).train()
    idx = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    loss_a, plain = _grads(model, idx, labels, seed=5)
    model.activation_checkpointing = True
    loss_b, ckpt = _grads(model, idx, labels, seed=5)
    assert torch.equal(loss_a, loss_b) and plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _saved_bytes(model, idx, labels):
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, labels, targets=idx, patch=1)
    return storages, loss


def test_attention_does_not_keep_the_fused_qkv_buffer_alive():
    model = make_gpt().train()
    b, t = 4, 64
    idx = torch.randint(0, 64, (b, t))
    storages, _ = _saved_bytes(model, idx, torch.tensor([0, 1, 2, 3]))
    dim = model.config.dim
    fused = b * t * 3 * dim * 4  # the wqkv output of a block (fp32)
    assert fused not in storages.values(), "a saved tensor still views the B x T x 3·dim q|k|v buffer"


def test_activation_checkpointing_saves_less():
    model = make_gpt().train()
    idx, labels = torch.randint(0, 64, (4, 64)), torch.tensor([0, 1, 2, 3])
    plain, _ = _saved_bytes(model, idx, labels)
    model.activation_checkpointing = True
    ckpt, _ = _saved_bytes(model, idx, labels)
    assert sum(ckpt.values()) < 0.5 * sum(plain.values()), (sum(ckpt.values()), sum(plain.values()))
