import pytest
import torch

from npp.models.generate import Sampler, draw, filter_logits, generate
from tests.helpers import make_gpt


def full_recompute_logits(model, tokens, labels):
    """Next-token logits for every position by a full forward (no cache)."""
    logits, _ = model(tokens.flatten(1), labels)
    return logits


def test_kv_cache_logits_equal_full_recompute():
    model = make_gpt(grid=(4, 6), vocab=32, n_kv_head=1)
    labels = torch.tensor([0, 3, 4])
    tokens, logits = generate(model, labels, cfg_scale=1.0, seed=0, return_logits=True)
    assert tokens.shape == (3, 4, 6)
    torch.testing.assert_close(logits, full_recompute_logits(model, tokens, labels), atol=1e-5, rtol=1e-5)


def test_guided_logits_follow_llamagen_formula():
    model = make_gpt(vocab=32)
    labels = torch.tensor([1, 2])
    tokens, logits = generate(model, labels, cfg_scale=3.0, seed=1, return_logits=True)
    cond = full_recompute_logits(model, tokens, labels)
    uncond = full_recompute_logits(model, tokens, torch.full_like(labels, model.config.num_classes))
    torch.testing.assert_close(logits, uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_cfg_interval_stops_guidance():
    model = make_gpt(vocab=32)
    labels = torch.tensor([1, 2])
    tokens, logits = generate(model, labels, cfg_scale=4.0, cfg_interval=5, seed=2, return_logits=True)
    cond = full_recompute_logits(model, tokens, labels)
    uncond = full_recompute_logits(model, tokens, torch.full_like(labels, model.config.num_classes))
    guided = uncond + 4.0 * (cond - uncond)
    # LlamaGen: the prefill token plus the next cfg_interval + 1 tokens are guided
    torch.testing.assert_close(logits[:, :7], guided[:, :7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[:, 7:], cond[:, 7:], atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_equals_unguided_sampling():
    """cfg_scale=1 draws exactly what a plain loop over the conditional model draws with the same rule: full
    recompute, top-k, temperature, and the inverse CDF of sample j's uniforms (seed·1000003 + j)."""
    model = make_gpt(vocab=32)
    labels = torch.tensor([0, 1, 2, 3])
    tokens = generate(model, labels, cfg_scale=1.0, temperature=0.9, top_k=20, seed=7)
    noise = torch.stack([torch.rand(64, generator=torch.Generator().manual_seed(7 * 1_000_003 + j)) for j in range(4)])
    seq = torch.empty(4, 0, dtype=torch.long)
    for i in range(64):
        logits = model(seq, labels)[0][:, -1] / 0.9
        cdf = filter_logits(logits, top_k=20).softmax(-1).cumsum(-1)
        nxt = torch.searchsorted(cdf, (noise[:, i] * cdf[:, -1])[:, None], right=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(tokens.flatten(1), seq)


def test_a_sample_depends_on_its_seed_and_id_not_on_its_batch():
    """Sample j's tokens are the same made in a piece of 4 or padded in a piece of 2 (ids 2 and 3)."""
    model = make_gpt(vocab=32)
    sampler = Sampler(model, 4, guidance=True, top_k=16)
    labels = torch.tensor([0, 1, 2, 3])
    whole = sampler.generate(labels, cfg_scale=2.0, seed=5, sample_ids=[0, 1, 2, 3])
    part = sampler.generate(labels[2:], cfg_scale=2.0, seed=5, sample_ids=[2, 3])
    assert torch.equal(whole[2:], part)
    other = sampler.generate(labels[2:], cfg_scale=2.0, seed=5, sample_ids=[3, 2])
    assert not torch.equal(part, other)


def test_a_token_of_zero_probability_is_never_drawn():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]] * 3)
    u = torch.tensor([0.0, 0.5, 0.999999])
    assert draw(logits, u, 1.0).tolist() == [0, 2, 2]


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_tokens_and_never_recompiles():
    """The token step as CUDA runs it (torch.compile, fullgraph, reduce-overhead; no graph capture on CPU):
    the same tokens as the eager step for a fixed seed, guidance, top-k and top-p on, and no recompilation
    across the positions of a generation or across pieces."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # count this test's graphs only
    model = make_gpt(vocab=64)
    labels = torch.tensor([0, 1, 3])
    kw = dict(temperature=0.8, top_k=40, top_p=0.9)
    eager = Sampler(model, 3, guidance=True, compile=False, **kw)
    compiled = Sampler(model, 3, guidance=True, compile=True, **kw)
    assert compiled.compiled and compiled.step is not compiled._step
    calls, lengths = [], set()
    real_step = compiled.step

    def step(*args):
        calls.append(args[1])
        length = compiled.caches[0].length
        torch._dynamo.config.error_on_recompile = length in lengths  # a bucket's first call compiles, no later one
        lengths.add(length)
        return real_step(*args)

    compiled.step = step
    try:
        a = compiled.generate(labels, cfg_scale=2.0, seed=11)
        b = compiled.generate(labels[:2], cfg_scale=4.0, seed=12)  # another piece: padded, another scale
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert len(calls) == 2 * 63 and lengths == {16, 32, 48, 64}  # four length buckets of the 64-slot cache
    assert torch.equal(a, eager.generate(labels, cfg_scale=2.0, seed=11))
    assert torch.equal(b, eager.generate(labels[:2], cfg_scale=4.0, seed=12))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4


def test_a_token_reads_its_length_bucket_of_the_cache_and_draws_the_whole_cache_tokens(monkeypatch):
    """The step attends the filled prefix rounded up to a quarter of the cache (a graph per bucket on CUDA),
    not the whole cache; the masked-out slots never mattered, so the tokens are the whole-cache step's."""
    from npp.models import gpt as gpt_module
    from npp.models.generate import bucket_lengths

    assert bucket_lengths(256, 4)[:3] == [64, 64, 64] and bucket_lengths(256, 4)[64] == 128
    assert sum(bucket_lengths(256, 4)) / 256**2 == 0.625 and set(bucket_lengths(256, 1)) == {256}
    model = make_gpt(vocab=64)
    labels = torch.tensor([0, 1, 3, 4])
    kw = dict(temperature=0.9, top_k=20, compile=False)
    read = []
    real_write = gpt_module.KVCache.write

    def write(self, start, k, v):
        keys, values, mask = real_write(self, start, k, v)
        read.append(keys.shape[2])
        return keys, values, mask

    monkeypatch.setattr(gpt_module.KVCache, "write", write)
    bucketed = Sampler(model, 4, guidance=True, length_buckets=4, **kw).generate(labels, cfg_scale=2.0, seed=3)
    per_layer = read[:: model.config.n_layer]
    assert per_layer[:17] == [16] * 16 + [32] and per_layer[-1] == 64  # the prefill, then 63 token steps
    read.clear()
    whole = Sampler(model, 4, guidance=True, length_buckets=1, **kw).generate(labels, cfg_scale=2.0, seed=3)
    assert set(read[model.config.n_layer:]) == {64}
    assert torch.equal(bucketed, whole)


def test_fixed_seed_gives_identical_tokens_and_other_seed_differs():
    model = make_gpt(vocab=32)
    labels = torch.tensor([0, 4])
    a = generate(model, labels, cfg_scale=2.0, seed=123)
    b = generate(model, labels, cfg_scale=2.0, seed=123)
    c = generate(model, labels, cfg_scale=2.0, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_restores_training_mode_and_clears_caches():
    model = make_gpt(vocab=32)
    model.train()
    generate(model, torch.tensor([0]), cfg_scale=1.5, seed=0)
    assert model.training
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    assert not any("cache" in name for name in model.state_dict())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 1.5, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=3))[0]
    assert kept.tolist() == [False, True, False, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_k=100)).all()


@pytest.mark.parametrize("top_p, support", [(0.45, {0}), (0.6, {0, 1}), (0.9, {0, 1, 2}), (0.99, {0, 1, 2, 3})])
def test_top_p_keeps_the_nucleus(top_p, support):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()[:, [2, 0, 3, 1]]  # shuffled: ids 0..3 hold probs .15 .5 .05 .3
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))[0].nonzero().flatten().tolist()
    by_prob = {0: 1, 1: 3, 2: 0, 3: 2}  # rank in the sorted order -> token id
    assert set(kept) == {by_prob[r] for r in support}


def test_sampled_tokens_stay_in_the_support():
    model = make_gpt(vocab=32)
    tokens = generate(model, torch.tensor([0] * 8), cfg_scale=1.0, top_k=1, seed=0)
    greedy = generate(model, torch.tensor([0] * 8), cfg_scale=1.0, top_k=1, seed=99)
    assert torch.equal(tokens, greedy)  # top_k=1 is greedy, whatever the seed


def test_guidance_needs_a_null_class():
    model = make_gpt(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        generate(model, torch.tensor([0]), cfg_scale=2.0)


def test_bf16_sampling_keeps_the_kv_cache_in_bf16_at_half_the_bytes():
    from npp.models.configs import gpt_config
    from npp.models.generate import kv_cache_bytes

    model = make_gpt()
    seen = {}
    for dtype in (torch.float32, torch.bfloat16):
        sampler = Sampler(model.to(dtype), 2, guidance=True)
        seen[dtype] = sum(c.k.nbytes + c.v.nbytes for c in sampler.caches)
        assert {c.k.dtype for c in sampler.caches} == {dtype}
        assert sampler.generate(torch.tensor([0, 1]), cfg_scale=2.0, seed=0).shape == (2, 8, 8)
    assert seen[torch.bfloat16] * 2 == seen[torch.float32] == kv_cache_bytes(model.config, 2, torch.float32)
    xxl = gpt_config("GPT-XXL", vocab_size=16384, block_size=256, num_classes=1000)
    assert kv_cache_bytes(xxl, 64, torch.bfloat16) == 9_663_676_416  # 9.7 GB (fp32: 19.3 GB)
