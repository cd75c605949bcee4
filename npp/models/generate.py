"""Token-by-token sampling with a KV cache and classifier-free guidance, one static step per token.

NPP changes training only: sampling is plain next-token (k = 1), as in LlamaGen.
Guidance runs the conditional and the null-class rows in one batch and combines
logits = uncond + (cond − uncond) · cfg_scale; `cfg_interval` N (LlamaGen's option, counted as its
sampler counts) guides the first N + 2 tokens only (the one the prefill draws, then N + 1).

The token step is static: the KV cache is allocated once for the whole sequence, the
position is a 0-d tensor, and the forward, guidance, temperature, top-k/top-p and the
draw happen inside the step without a shape change or a host read, so on CUDA the step
is compiled and replayed as a CUDA graph for every token
(`torch.compile(mode="reduce-overhead", fullgraph=True)`): eager decoding launched
~550 small kernels per GPT-B token from the host, ten times the GPU's own time. A token
attends the cache's first `length` slots, the filled prefix rounded up to one of
`length_buckets` lengths (a graph each), not the whole cache: with 4 buckets a
generation reads 62.5% of the cache bytes the whole-cache step read (the prefix alone
would be 50%), and the mask hides the slots not yet written, so the tokens are those of
the whole-cache step. The class-token prefill runs apart, eagerly. Eager is the path on
CPU and with compile off, through the same buckets.

The draw is inverse-CDF sampling with uniforms drawn before the loop: sample j of a
`generate` call gets `u = torch.rand(tokens)` from a CPU generator seeded with
`seed·1000003 + sample_ids[j]`, and token i is the first one whose cumulative
probability exceeds u[i]·total. So a sample depends on its seed and id alone, not on
the batch it is made in, the number of processes, or the device's RNG.
"""

from __future__ import annotations

import torch

from npp.errors import ConfigError

from .gpt import GPT, KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf.

    top-k keeps every logit at least as large as the k-th largest (ties kept);
    top-p keeps the sorted tokens up to and including the first one at which the
    cumulative mass exceeds top_p (so the most likely token is always kept).
    """
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already exceeds top_p (LlamaGen's rule)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) > top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, u: torch.Tensor, temperature, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row of logits (B, V) by inverse CDF: the first token whose cumulative probability
    exceeds u·total, for u (B,) uniform in [0, 1). A token of zero probability is never drawn."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    below = (cdf <= u.to(cdf.dtype)[:, None] * cdf[:, -1:]).sum(dim=-1)
    return below.clamp(max=logits.shape[-1] - 1)


def guides(cfg_scale: float) -> bool:
    """Whether a classifier-free guidance scale guides: any scale but 1 (LlamaGen ignores scales below 1; here 0
    samples from the null class alone). 1 runs no unconditional rows at all: exactly unguided sampling."""
    return float(cfg_scale) != 1.0


def guide(logits: torch.Tensor, cfg_scale, guided=True) -> torch.Tensor:
    """Combine the stacked [cond; uncond] halves into the guided logits (`guided` may be a bool tensor)."""
    cond, uncond = logits.chunk(2, dim=0)
    mixed = uncond + (cond - uncond) * cfg_scale
    if isinstance(guided, torch.Tensor):
        return torch.where(guided, mixed, cond)
    return mixed if guided else cond


def sample_noise(batch: int, n_tokens: int, seed: int | None, sample_ids=None) -> torch.Tensor:
    """(batch, n_tokens) uniforms: row j from a CPU generator seeded with seed·1000003 + sample_ids[j]."""
    if seed is None:
        return torch.rand(batch, n_tokens)
    ids = range(batch) if sample_ids is None else [int(i) for i in sample_ids]
    rows = []
    for j in ids:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + j)
        rows.append(torch.rand(n_tokens, generator=gen))
    return torch.stack(rows)


def bucket_lengths(n_tokens: int, buckets: int) -> list[int]:
    """For each position i, the cache slots its token step attends: i + 1 rounded up to a multiple of
    n_tokens / buckets (1 bucket: the whole cache at every position)."""
    size = -(-n_tokens // max(1, int(buckets)))
    return [min(n_tokens, -(-(i + 1) // size) * size) for i in range(n_tokens)]


def compile_default(device: torch.device) -> bool:
    return device.type == "cuda"


class Sampler:
    """KV caches for `batch` samples (twice that with guidance) of the model's full length, allocated once,
    and the token step (compiled and graph-captured on CUDA). Reuse one Sampler for every piece of a
    run: the caches and the captured graph stay; a smaller last piece is padded to the batch."""

    def __init__(self, model: GPT, batch: int, guidance: bool, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, cfg_interval: int = -1, compile: bool | None = None, length_buckets: int = 4):
        cfg = model.config
        if guidance and not cfg.has_null_class:
            raise ConfigError("this model was trained without label dropout (no null class): use cfg_scale=1")
        self.model, self.batch, self.guidance = model, batch, guidance
        self.top_k, self.top_p, self.cfg_interval = int(top_k), float(top_p), int(cfg_interval)
        self.n_tokens = cfg.grid[0] * cfg.grid[1]
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rows = batch * (2 if guidance else 1)
        self.caches = [KVCache(self.rows, self.n_tokens, cfg.kv_heads, cfg.head_dim, self.dtype, self.device)
                       for _ in model.layers]
        self.positions = torch.arange(self.n_tokens, device=self.device)
        self.temperature = torch.tensor(max(float(temperature), 1e-5), device=self.device)
        self.lengths = bucket_lengths(self.n_tokens, length_buckets)
        self.compiled = compile_default(self.device) if compile is None else bool(compile)
        self.step = self._step
        if self.compiled:
            import torch._dynamo.config as dynamo_config

            # a graph per length bucket, per sampler (guided and unguided in one run): over dynamo's default of 8
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(self.lengths))
            for cache in self.caches:  # their addresses never change: a CUDA graph may read and write them in place
                for t in (cache.k, cache.v, cache.positions):
                    torch._dynamo.mark_static_address(t)
            self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def _attach(self) -> None:
        for layer, cache in zip(self.model.layers, self.caches, strict=False):
            layer.attention.kv_cache = cache

    def _detach(self) -> None:
        for cache in self.caches:
            cache.length = None
        self.model.clear_caches()

    def _set_length(self, n: int) -> None:
        if self.caches[0].length != n:
            for cache in self.caches:
                cache.length = n

    def _mix(self, logits: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.guidance:
            return logits
        # LlamaGen's cfg_interval: the prefill token and the next cfg_interval+1 are guided
        guided = True if self.cfg_interval < 0 else pos <= self.cfg_interval + 1
        return guide(logits, scale, guided)

    def _step(self, feed: torch.Tensor, pos: torch.Tensor, u: torch.Tensor, scale: torch.Tensor):
        """Feed the previous token at `pos`; returns (the token at `pos`, its guided logits)."""
        logits = self.model.decode(pos, tokens=feed)[:, -1]
        mixed = self._mix(logits, scale, pos)
        return draw(mixed, u, self.temperature, self.top_k, self.top_p), mixed

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, cfg_scale: float = 1.0, seed: int | None = None, sample_ids=None,
                 return_logits: bool = False):
        """Token grids (B, rows, cols) for class labels (B,), B <= the batch; see the module docstring for seeds."""
        n_real = labels.shape[0]
        if n_real > self.batch:
            raise ValueError(f"{n_real} labels for a sampler of batch {self.batch}")
        if self.guidance != guides(cfg_scale):
            raise ValueError("this sampler was built for " + ("guided" if self.guidance else "unguided") + " sampling")
        rows, cols = self.model.config.grid
        noise = sample_noise(n_real, self.n_tokens, seed, sample_ids)
        if n_real < self.batch:  # pad to the static batch: the extra rows are sampled and dropped
            labels = torch.cat([labels, labels.new_zeros(self.batch - n_real)])
            noise = torch.cat([noise, torch.rand(self.batch - n_real, self.n_tokens, generator=torch.Generator())])
        noise = noise.to(self.device)
        cond = torch.cat([labels, torch.full_like(labels, self.model.config.num_classes)]) if self.guidance else labels
        scale = torch.tensor(float(cfg_scale), device=self.device)
        was_training = self.model.training
        self.model.eval()
        self._attach()
        tokens = torch.empty(self.batch, self.n_tokens, dtype=torch.long, device=self.device)
        kept = [] if return_logits else None
        try:
            pos0 = self.positions[0]
            self._set_length(self.lengths[0])
            logits = self._mix(self.model.decode(pos0, labels=cond)[:, -1], scale, pos0)  # the prefill, eager
            tok = draw(logits, noise[:, 0], self.temperature, self.top_k, self.top_p)
            if kept is not None:
                kept.append(logits.float().clone())
            tokens[:, 0] = tok
            for i in range(1, self.n_tokens):
                feed = (torch.cat([tok, tok]) if self.guidance else tok)[:, None]
                self._set_length(self.lengths[i])
                tok, logits = self.step(feed, self.positions[i], noise[:, i], scale)
                tokens[:, i] = tok  # copied out: a graph replay reuses its output buffers
                if kept is not None:
                    kept.append(logits.float().clone())
        finally:
            self._detach()
            self.model.train(was_training)
        grid = tokens[:n_real].view(n_real, rows, cols)
        if return_logits:
            return grid, torch.stack(kept, dim=1)[:n_real]
        return grid


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_interval: int = -1,
    seed: int | None = None,
    return_logits: bool = False,
    sample_ids=None,
    compile: bool | None = False,
):
    """Sample full token grids (B, rows, cols) for class labels (B,) with a Sampler made for this call.

    Whether `cfg_scale` guides is `guides(cfg_scale)`. A fixed seed fixes the tokens (see the module
    docstring). With return_logits, also returns the (B, rows·cols, V) logits each token was
    drawn from. For many batches build one `Sampler` and call its `generate`.
    """
    sampler = Sampler(model, labels.shape[0], guides(cfg_scale), temperature, top_k, top_p, cfg_interval, compile)
    return sampler.generate(labels, cfg_scale, seed, sample_ids, return_logits)


def kv_cache_bytes(config, batch: int, dtype: torch.dtype, cfg: bool = True) -> int:
    """Bytes of the KV cache a Sampler allocates: k and v per layer for the whole sequence (CFG doubles the batch)."""
    rows = batch * (2 if cfg else 1)
    per_layer = 2 * rows * config.kv_heads * config.block_size * config.head_dim
    return per_layer * config.n_layer * torch.empty((), dtype=dtype).element_size()
