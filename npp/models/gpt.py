"""Class-conditional decoder-only GPT (LlamaGen c2i architecture) with the patch forward.

Parameter names and shapes are LlamaGen's, so its checkpoints and NPP's load here
unchanged, and ours load in their code. The model knows nothing of files,
DeepSpeed or tracking: see `checkpoint.py` for loading and `generate.py` for sampling.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .configs import GPTConfig
from .patches import check_patch_side, patch_embeddings, patch_targets


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast, as LlamaGen does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class ClassEmbedding(nn.Module):
    """Class label → one prefix embedding; label dropout to the null class trains guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        # The extra row is the null class; LlamaGen only has it when labels are dropped.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, drop_labels: bool) -> torch.Tensor:
        if drop_labels and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class DropPath(nn.Module):
    """Stochastic depth: drop a block's residual branch for whole samples.

    The rate is a tensor (a non-persistent integer buffer, in millionths, so a state dict is LlamaGen's and a cast
    to bf16 leaves it exact), not a Python float: dynamo guards on a float attribute's value, so each layer's own
    rate made the compiled block recompile per layer (144 compiles of GPT-XXL per restart); a tensor is a graph
    input and every layer shares one graph per patch side. Every block has one when the rate is above 0, layer 0
    (rate 0) too, for the same reason.
    """

    def __init__(self, p: float):
        super().__init__()
        self.register_buffer("rate_ppm", torch.tensor(round(p * 1_000_000), dtype=torch.int64), persistent=False)

    @property
    def p(self) -> float:
        return float(self.rate_ppm) / 1_000_000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (1_000_000 - self.rate_ppm).to(torch.float32) / 1_000_000
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=torch.float32) < keep
        return x * (mask.to(torch.float32) / keep).to(x.dtype)


def rope_2d(rows: int, cols: int, head_dim: int, base: float, device=None) -> torch.Tensor:
    """2-D rotary table for a class token followed by a rows×cols grid: (1 + rows·cols, head_dim/2, 2).

    The first half of each head's rotary pairs turns with the row index, the second
    half with the column index (integer grid coordinates). The class token's slot is
    all zeros (cos = sin = 0), so its query and key vanish: LlamaGen's checkpoints
    were trained with exactly that.
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, quarter, device=device, dtype=torch.float32) * 2 / (head_dim // 2)))
    row_angles = torch.outer(torch.arange(rows, device=device, dtype=torch.float32), inv_freq)
    col_angles = torch.outer(torch.arange(cols, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat(
        [row_angles[:, None, :].expand(rows, cols, quarter), col_angles[None, :, :].expand(rows, cols, quarter)],
        dim=-1,
    ).reshape(rows * cols, 2 * quarter)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(1, 2 * quarter, 2, device=device), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, H, Dh) by the angles of rope (T, Dh/2, 2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[None, :, None, :, 0]
    sin = rope[None, :, None, :, 1]
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every position of one layer, allocated once for the whole sequence.

    A plain object, never in a state dict. `write` takes the first new position as an
    int (a range of new positions; the past is sliced, shapes grow) or as a 0-d tensor
    (one new position; the first `length` slots are attended with a mask of the positions
    written so far). The tensor form keeps every shape and the control flow of a token
    step the same at every position of a length bucket, so the step is compiled once per
    bucket and captured as a CUDA graph (npp.models.generate); `length` (the whole cache
    when None) is what the sampler sets so that a token reads the filled prefix rounded up
    to its bucket, not all of the cache: decoding is bound by reading it.
    """

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(max_len, device=device)
        self.length: int | None = None

    def write(self, start, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, S, Dh) from position `start`; returns (keys, values, mask or None) to attend to."""
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start.view(1), k)
            self.v.index_copy_(2, start.view(1), v)
            n = self.k.shape[2] if self.length is None else self.length
            return self.k[:, :, :n], self.v[:, :, :n], (self.positions[:n] <= start)[None, None, None, :]
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        mask = None
        if k.shape[2] > 1:  # several new positions: each sees the past and the new ones before it
            mask = self.positions[:end][None, :] <= self.positions[start:end][:, None]
        return self.k[:, :, :end], self.v[:, :, :end], mask


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dim = cfg.dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start=None) -> torch.Tensor:
        """`start`: None (a full sequence, causal), or the first cached position (int, or a 0-d tensor)."""
        b, t, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, t, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        # v is a view of the fused q|k|v output; attention saves v for backward, which would
        # pin the whole B x T x 3·dim buffer until backward. A copy of v alone lets it go
        # (q and k are new tensors after the rotation already).
        v = v.reshape(b, t, self.n_kv_head, self.head_dim).transpose(1, 2).contiguous()

        mask, causal = None, True
        if start is not None:
            if self.kv_cache is None:
                raise RuntimeError("decoding with a position needs caches: call model.setup_caches first")
            k, v, mask = self.kv_cache.write(start, k, v)
            causal = False
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.attn_dropout_p if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, t, self.dim)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if cfg.drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start=None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, start))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class GPT(nn.Module):
    """Class-conditional GPT over a VQ token grid.

    `model(idx, labels, targets=idx, patch=k)` trains Next Patch Prediction with
    patch side k (k = 1 is next-token prediction); `model(idx, labels)` gives
    next-token logits; `setup_caches` + `decode` serve KV-cached sampling.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = ClassEmbedding(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, r) for r in rates)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: dict[tuple, torch.Tensor] = {}
        # Run settings, not part of the saved config:
        # per-block activation checkpointing in training;
        self.activation_checkpointing = False
        # the dtype the teacher-forced forward autocasts to (bf16-mixed training), None for the weights' own dtype.
        # The autocast is entered here, inside the module, because DeepSpeed's engine.forward switches an
        # autocast opened around it off (on CUDA) unless its config has a torch_autocast section.
        self.autocast_dtype: torch.dtype | None = None
        # the training head (norm, output projection, patch loss): compiled with the blocks (compile_blocks)
        self._head_loss = head_and_loss
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        # A zero head starts every position at the uniform distribution over the codebook.
        nn.init.zeros_(self.output.weight)

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    def rope_for(self, patch_side: int, device) -> torch.Tensor:
        """Rotary table in patch-grid coordinates for patch side k (cached per k and device)."""
        prow, pcol = check_patch_side(self.grid, patch_side)
        key = (prow, pcol, str(device))
        if key not in self._rope:
            self._rope[key] = rope_2d(prow, pcol, self.config.head_dim, self.config.rope_base, device=device)
        return self._rope[key]

    def compile_blocks(self, **kwargs) -> None:
        """Compile each transformer block for full-sequence forwards (training), as torchtitan does.

        A block at a time keeps compile time to one block's graph, shared by every layer
        (parameters are graph inputs), and one graph per patch side (shapes are static, so
        a stage never recompiles; the next stage's sequence length compiles once more).
        The module objects and their state-dict names are unchanged (`nn.Module.compile`).
        KV-cached decoding calls the blocks' eager forward: its position changes every token.
        """
        import torch._dynamo.config as dynamo_config

        # a graph per (patch side, train/eval, per-layer constants such as a drop-path rate)
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(self.layers))
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                        64 * len(self.layers))
        for layer in self.layers:
            layer.compile(**{"dynamic": False, **kwargs})
        self._head_loss = torch.compile(head_and_loss, **{"dynamic": False, **kwargs})

    @property
    def blocks_compiled(self) -> bool:
        return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in self.layers)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()  # an autocast the caller opened stays in force
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _trunk(self, h: torch.Tensor, rope: torch.Tensor, start=None) -> torch.Tensor:
        """fp32 logits of every position (decoding, next-token logits)."""
        return self.output(self.norm(self._blocks(h, rope, start))).float()

    def _blocks(self, h: torch.Tensor, rope: torch.Tensor, start=None) -> torch.Tensor:
        h = self.tok_dropout(h)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and start is None
        for layer in self.layers:
            if recompute:  # keep only each block's input; recompute its insides in backward (same dropout masks)
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, use_reentrant=False)
            elif start is not None:  # decoding: the eager forward (a compiled block would recompile per position)
                h = layer.forward(h, rope, start)
            else:
                h = layer(h, rope)
        return h

    def forward(
        self,
        idx: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None = None,
        patch: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits (and the patch loss when targets are given).

        With targets: idx and targets are full grids (B, rows·cols); logits are
        (B, patches, vocab), position j predicting every token of patch j. Without
        targets: idx is a prefix (B, T) of raster tokens and logits are
        (B, min(T + 1, rows·cols), vocab), position j predicting token j.
        """
        with self._autocast(idx.device):
            return self._forward(idx, labels, targets, patch)

    def _forward(self, idx, labels, targets, patch):
        n_tokens = self.grid[0] * self.grid[1]
        drop_labels = self.training and targets is not None
        cls = self.cls_embedding(labels, drop_labels=drop_labels)
        if targets is None:
            if patch != 1:
                raise ValueError("logits without targets are next-token logits: patch must be 1")
            tok = self.tok_embeddings(idx[:, : n_tokens - 1])
            h = torch.cat([cls, tok], dim=1)
            return self._trunk(h, self.rope_for(1, h.device)[: h.shape[1]]), None

        if idx.shape[1] != n_tokens or targets.shape != idx.shape:
            raise ValueError(
                f"training needs full token grids of {n_tokens} tokens ({self.grid[0]}x{self.grid[1]}); "
                f"got idx {tuple(idx.shape)} and targets {tuple(targets.shape)}"
            )
        check_patch_side(self.grid, patch)
        patches = patch_embeddings(self.tok_embeddings(idx), self.grid, patch)
        h = torch.cat([cls, patches[:, :-1]], dim=1)  # the last patch has nothing after it to predict
        h = self._blocks(h, self.rope_for(patch, h.device)[: h.shape[1]])
        return self._head_loss(self.norm, self.output, h, patch_targets(targets, self.grid, patch))

    # --- KV-cached decoding -------------------------------------------------------
    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype, device) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch, max_len, self.config.kv_heads, self.config.head_dim, dtype, device
            )

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    @torch.no_grad()
    def decode(self, start, tokens: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Logits (B, S, vocab) for S new positions from `start`, using and filling the caches.

        Position 0 is the class token (pass `labels`); later positions take `tokens` (B, S).
        `start` as a 0-d tensor decodes one position with static shapes (see KVCache).
        """
        if (labels is None) == (tokens is None):
            raise ValueError("decode takes labels (position 0) or tokens (later positions), not both")
        h = self.cls_embedding(labels, drop_labels=False) if labels is not None else self.tok_embeddings(tokens)
        table = self.rope_for(1, h.device)
        if isinstance(start, torch.Tensor):
            if h.shape[1] != 1:
                raise ValueError("a tensor position decodes one position at a time")
            rope = table.index_select(0, start.view(1))
        else:
            rope = table[start : start + h.shape[1]]
        return self._trunk(h, rope, start)


def head_and_loss(norm: nn.Module, output: nn.Module, h: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training head: final RMSNorm, output projection (bf16 under bf16-mixed's autocast) and `patch_loss`,
    one function so that `torch.compile` fuses it (GPT.compile_blocks): the fp32 upcast, log-softmax and gather
    of the loss and their backward then run in registers over the bf16 logits, instead of materialising
    batch x patches x 16384 fp32 logits and log-probabilities eagerly (~10% of a GPT-B step's memory traffic).
    Returns (logits in the projection's dtype, the fp32 loss)."""
    logits = output(norm(h))  # through the modules: ZeRO-3's hooks gather their weights
    return logits, patch_loss(logits, targets)


def patch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the k² tokens of its patch.

    logits (B, P, V), targets (B, P, k²). One log-softmax per position, then a gather
    of the k² target log-probabilities: the logits are never repeated k² times, so the
    loss costs the same as NTP's on the shorter sequence.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets).mean()


def configure_optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings (≥ 2-D), not norms (LlamaGen/nanoGPT rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
