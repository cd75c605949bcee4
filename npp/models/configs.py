"""GPT configuration and the size registry.

`GPTConfig` takes LlamaGen's `ModelArgs` field names, so an argument dict from a
LlamaGen or NPP run (or the `args` stored in their checkpoints) builds the same
network here. Fields that only matter to LlamaGen's text-to-image variant
(caption_dim, model_type, max_batch_size, max_seq_len) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from npp.errors import ConfigError


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (LlamaGen's `find_multiple`)."""
    return n if n % multiple == 0 else n + multiple - n % multiple


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    # The NPP paper's appendix trains with attention dropout 0.1; its code (and
    # LlamaGen) default to 0. We keep the architecture default of the code and
    # let the trainer choose.
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    class_dropout_prob: float = 0.1

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    # Token grid (rows, cols). None means square: sqrt(block_size) per side.
    grid: tuple[int, int] | None = None

    # LlamaGen fields with no meaning for a class-conditional model (a class
    # attribute: it has no annotation, so it is not a dataclass field).
    _IGNORED = ("caption_dim", "model_type", "max_batch_size", "max_seq_len")

    def __post_init__(self) -> None:
        if self.grid is None:
            side = math.isqrt(self.block_size)
            if side * side != self.block_size:
                raise ConfigError(
                    f"block_size={self.block_size} is not a square: pass grid=(rows, cols) for a non-square token grid"
                )
            self.grid = (side, side)
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.grid[0] * self.grid[1] != self.block_size:
            raise ConfigError(
                f"grid {self.grid} holds {self.grid[0] * self.grid[1]} tokens, block_size is {self.block_size}"
            )
        if self.dim % self.n_head:
            raise ConfigError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 4:
            # 2-D RoPE splits each head in a row half and a column half of rotary pairs.
            raise ConfigError(f"head dim {self.head_dim} must be divisible by 4 for 2-D RoPE")
        if self.cls_token_num != 1:
            raise ConfigError("a class-conditional GPT uses exactly one class token (cls_token_num=1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width: 2/3 of 4·dim, optionally scaled, rounded up to `multiple_of`."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)

    @property
    def has_null_class(self) -> bool:
        """LlamaGen adds the guidance (null) row to the class table only when labels are dropped."""
        return self.class_dropout_prob > 0

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> GPTConfig:
        """Build from a dict of LlamaGen/NPP model arguments; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in args if k not in names and k not in cls._IGNORED)
        if unknown:
            raise ConfigError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(names)}")
        kept = {k: v for k, v in args.items() if k in names}
        if kept.get("grid") is not None:
            kept["grid"] = tuple(kept["grid"])
        return cls(**kept)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d


# name -> (n_layer, n_head, dim). The first five are LlamaGen's class-conditional
# sizes; the small ones are ours, for tests, the demo and CPU benchmarks.
GPT_SIZES: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-S": (8, 8, 384),
    "GPT-Mini": (6, 4, 256),
    "GPT-Tiny": (4, 4, 128),
    "GPT-Nano": (2, 2, 64),
}


def gpt_config(name: str, **overrides: Any) -> GPTConfig:
    """The config of a named size, with field overrides (vocab_size, block_size, num_classes, ...)."""
    try:
        n_layer, n_head, dim = GPT_SIZES[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(GPT_SIZES)}") from None
    return GPTConfig.from_dict({"n_layer": n_layer, "n_head": n_head, "dim": dim, **overrides})


def count_parameters(cfg: GPTConfig) -> int:
    """Parameter count from the architecture alone (no module is built)."""
    kv_dim = cfg.kv_heads * cfg.head_dim
    per_layer = (
        cfg.dim * (cfg.dim + 2 * kv_dim)  # fused wqkv
        + cfg.dim * cfg.dim  # wo
        + 3 * cfg.dim * cfg.ffn_hidden  # w1, w2, w3
        + 2 * cfg.dim  # two RMSNorm weights
    )
    classes = (cfg.num_classes + int(cfg.has_null_class)) * cfg.dim
    embeddings = cfg.vocab_size * cfg.dim
    head = cfg.vocab_size * cfg.dim + cfg.dim  # output projection + final norm
    return cfg.n_layer * per_layer + classes + embeddings + head


def _matmul_params(cfg: GPTConfig) -> int:
    """Parameters used in a matmul for every position (embeddings are lookups, norms elementwise)."""
    kv_dim = cfg.kv_heads * cfg.head_dim
    per_layer = cfg.dim * (cfg.dim + 2 * kv_dim) + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden
    return cfg.n_layer * per_layer + cfg.vocab_size * cfg.dim


def train_flops_per_sample(cfg: GPTConfig, patch_side: int) -> float:
    """Training FLOPs (forward + backward) for one image at patch side k.

    The sequence has one position per patch (class token + patches − 1 = rows·cols / k²).
    Matmuls cost 6·P per position (2 forward, 4 backward), attention scores and
    their weighted sum 12·n_layer·dim·T per position (PaLM's accounting, no causal
    discount). The k² targets of a position share one logit vector, so the loss
    adds nothing that grows with k.
    """
    rows, cols = cfg.grid
    seq = (rows // patch_side) * (cols // patch_side)
    return 6.0 * _matmul_params(cfg) * seq + 12.0 * cfg.n_layer * cfg.dim * seq * seq



def check_patch_side(grid: tuple[int, int], patch_side: int) -> tuple[int, int]:
    """The patch grid (rows/k, cols/k); a k that does not divide both sides is a ConfigError."""
    rows, cols = grid
    if patch_side < 1 or rows % patch_side or cols % patch_side:
        raise ConfigError(
            f"patch side {patch_side} does not divide the {rows}x{cols} token grid; "
            f"use a k that divides both {rows} and {cols}"
        )
    return rows // patch_side, cols // patch_side
