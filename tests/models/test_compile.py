"""The compiled training forward: the same loss and gradients as eager, bf16 where asked, flash-eligible attention."""

import pytest
import torch
import torch.nn.functional as F

from npp.models import gpt as gpt_module
from tests.helpers import make_gpt


def _loss_and_grads(model, idx, labels, k):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, labels, targets=idx, patch=k)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_blocks_give_eager_loss_and_gradients():
    """Dropout off (the compiled graph draws its masks from other kernels); everything else as in training."""
    torch.manual_seed(0)
    idx, labels = torch.randint(0, 64, (4, 64)), torch.randint(0, 5, (4,))
    kw = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0, class_dropout_prob=0.0)
    eager, compiled = make_gpt(**kw).train(), make_gpt(**kw).train()
    compiled.compile_blocks()
    assert compiled.blocks_compiled and not eager.blocks_compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged: checkpoints stay LlamaGen's
    torch._dynamo.utils.counters.clear()
    loss_e, grads_e = _loss_and_grads(eager, idx, labels, 2)
    loss_c, grads_c = _loss_and_grads(compiled, idx, labels, 2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the block and the head+loss, compiled
    assert compiled._head_loss is not gpt_module.head_and_loss and eager._head_loss is gpt_module.head_and_loss
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    # bf16-mixed: bf16 logits (never an fp32 copy of them returned), the loss accumulated in fp32, as eager
    for model in (eager, compiled):
        model.autocast_dtype = torch.bfloat16
    logits_c, loss_c = compiled(idx, labels, targets=idx, patch=1)
    logits_e, loss_e = eager(idx, labels, targets=idx, patch=1)
    assert logits_c.dtype == logits_e.dtype == torch.bfloat16 and loss_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-2, atol=2e-2)
    # KV-cached decoding runs the blocks eagerly: the position changes every token, which would recompile
    compiled.eval()
    compiled.setup_caches(2, 64, torch.float32, "cpu")
    try:
        with torch.no_grad():
            torch._dynamo.config.error_on_recompile = True
            compiled.decode(0, labels=labels[:2])
            for pos in range(1, 4):
                compiled.decode(pos, tokens=idx[:2, pos - 1 : pos])
    finally:
        torch._dynamo.config.error_on_recompile = False
        compiled.clear_caches()


def test_drop_path_compiles_one_graph_per_patch_side_for_every_layer(monkeypatch):
    """Each layer has its own stochastic-depth rate (linear in depth, layer 0 at 0): a rate dynamo guards on would
    compile the block once per layer. Guards are the backend's inputs, so the eager backend settles it quickly."""
    torch._dynamo.reset()
    model = make_gpt(drop_path_rate=0.2, n_layer=4).train()
    assert {round(layer.drop_path.p, 6) for layer in model.layers} == {0.0, round(0.2 / 3, 6), round(0.4 / 3, 6), 0.2}
    model.compile_blocks(backend="eager")
    idx, labels = torch.randint(0, 64, (4, 64)), torch.randint(0, 5, (4,))
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for _ in range(2):
        _, loss = model(idx, labels, targets=idx, patch=2)
        loss.backward()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", False)
    _, loss = model(idx, labels, targets=idx, patch=1)  # the next stage: one more graph, for all layers
    loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # per patch side: the block and the head
    model.to(torch.bfloat16)
    assert model.layers[3].drop_path.p == 0.2  # the rate survives a cast of the weights
    torch._dynamo.reset()


def test_bf16_mixed_autocast_is_opened_inside_the_model(monkeypatch):
    """What DeepSpeed's engine does on a GPU: an autocast around the model switched off. The model's own
    autocast (bf16-mixed) still runs its matmuls in bf16, and attention gets bf16 q/k/v, as flash needs."""
    model = make_gpt(attn_dropout_p=0.1).train()
    model.autocast_dtype = torch.bfloat16
    linear_dtypes, attention_inputs = set(), []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: linear_dtypes.add(out.dtype) if isinstance(m, torch.nn.Linear) else None)
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, **kw):
        attention_inputs.append((q.dtype, k.dtype, v.dtype, attn_mask, is_causal, q.shape[-1], q.stride(-1)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, **kw)

    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention", recording_sdpa)
    idx, labels = torch.randint(0, 64, (2, 64)), torch.randint(0, 5, (2,))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
            _, loss = model(idx, labels, targets=idx, patch=2)
    finally:
        hook.remove()
    loss.backward()
    assert linear_dtypes == {torch.bfloat16}
    assert loss.dtype == torch.float32  # the loss is taken in fp32 (log-softmax of fp32 logits)
    assert len(attention_inputs) == len(model.layers)
    for q, k, v, mask, causal, head_dim, last_stride in attention_inputs:
        # FlashAttention-2's conditions: one half dtype, no explicit mask (causal flag), head_dim % 8 == 0, <= 256
        assert (q, k, v) == (torch.bfloat16,) * 3 and mask is None and causal
        assert head_dim % 8 == 0 and head_dim <= 256 and last_stride == 1
    # without the setting an autocast opened by the caller stays in force, and none is opened otherwise
    model.autocast_dtype = None
    linear_dtypes.clear()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: linear_dtypes.add(out.dtype) if isinstance(m, torch.nn.Linear) else None)
    try:
        model(idx, labels, targets=idx, patch=2)
        assert linear_dtypes == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, labels, targets=idx, patch=2)
        assert linear_dtypes == {torch.float32, torch.bfloat16}
    finally:
        hook.remove()
