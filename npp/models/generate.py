"""Token-by-token sampling with a KV cache and classifier-free guidance.

NPP changes training only: sampling is plain next-token (k = 1), as in LlamaGen.
Guidance runs the conditional and the null-class rows in one batch and combines
logits = uncond + (cond − uncond) · cfg_scale; `cfg_interval` switches guidance off
after that many tokens (LlamaGen's option).
"""

from __future__ import annotations

from typing import Optional

import torch

from npp.errors import ConfigError

from .gpt import GPT


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


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """One token per row of logits (B, V)."""
    logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def guide(logits: torch.Tensor, cfg_scale: float, guided: bool) -> torch.Tensor:
    """Combine the stacked [cond; uncond] halves into the guided logits."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_scale if guided else cond


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_interval: int = -1,
    seed: Optional[int] = None,
    return_logits: bool = False,
):
    """Sample full token grids (B, rows, cols) for class labels (B,).

    cfg_scale = 1 runs no unconditional rows at all, so it is exactly unguided
    sampling. Unlike LlamaGen, which ignores scales below 1, any scale != 1 guides
    (0 samples from the null class alone). A fixed seed fixes the tokens (for a given device and batch).
    With return_logits, also returns the (B, rows·cols, V) logits each token was drawn from.
    """
    cfg = model.config
    rows, cols = cfg.grid
    n_tokens = rows * cols
    device = labels.device
    use_cfg = cfg_scale != 1.0
    if use_cfg and not cfg.has_null_class:
        raise ConfigError("this model was trained without label dropout (no null class): use cfg_scale=1")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    batch = labels.shape[0]
    cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if use_cfg else labels
    dtype = next(model.parameters()).dtype
    model.setup_caches(cond.shape[0], n_tokens, dtype, device)
    tokens = torch.empty(batch, n_tokens, dtype=torch.long, device=device)
    all_logits = [] if return_logits else None
    try:
        logits = model.decode(0, labels=cond)[:, -1]
        for i in range(n_tokens):
            # LlamaGen's cfg_interval: the prefill token and the next cfg_interval+1 are guided.
            guided = use_cfg and (cfg_interval < 0 or i <= cfg_interval + 1)
            step_logits = guide(logits, cfg_scale, guided) if use_cfg else logits
            if all_logits is not None:
                all_logits.append(step_logits)
            nxt = sample_tokens(step_logits, temperature, top_k, top_p, generator)
            tokens[:, i] = nxt[:, 0]
            if i + 1 < n_tokens:
                feed = torch.cat([nxt, nxt]) if use_cfg else nxt
                logits = model.decode(i + 1, tokens=feed)[:, -1]
    finally:
        model.clear_caches()
        model.train(was_training)
    grid = tokens.view(batch, rows, cols)
    if return_logits:
        return grid, torch.stack(all_logits, dim=1)
    return grid


def kv_cache_bytes(config, batch: int, dtype: torch.dtype, cfg: bool = True) -> int:
    """Bytes of the KV cache `generate` allocates: k and v per layer for the whole sequence (CFG doubles the batch)."""
    rows = batch * (2 if cfg else 1)
    per_layer = 2 * rows * config.kv_heads * config.block_size * config.head_dim
    return per_layer * config.n_layer * torch.empty((), dtype=dtype).element_size()
