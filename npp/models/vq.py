"""VQ tokenizer with LlamaGen's architecture and parameter names.

`vq_ds16_c2i.pt` (`{"model": state_dict}`, with the `quantize.codebook_used`
buffer) loads as it is. Widths are configurable (`ch`, `norm_groups`) so the same
network, much narrower, can be fitted on a small dataset on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from npp.errors import ConfigError


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    # Not LlamaGen arguments (fixed there at 128, 2 and 32): widths for small tokenizers.
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> VQConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(f"unknown VQConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VQ_PRESETS = {
    # LlamaGen's VQ-16 and VQ-8 (ImageNet 256: 16×16 and 32×32 codes)
    "VQ-16": {},
    "VQ-8": {"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4]},
    # ours, for 32 px images on a CPU: 8×8 codes from a 4× downsampling
    "VQ-toy": {
        "codebook_size": 512, "encoder_ch_mult": [1, 2, 2], "decoder_ch_mult": [1, 2, 2],
        "z_channels": 32, "ch": 16, "num_res_blocks": 1, "norm_groups": 8,
    },
}


def vq_config(name: str, **overrides: Any) -> VQConfig:
    if name not in VQ_PRESETS:
        raise ConfigError(f"unknown tokenizer {name!r}; choose one of {sorted(VQ_PRESETS)}")
    return VQConfig.from_dict({**VQ_PRESETS[name], **overrides})


def decode_bytes_per_image(cfg: VQConfig, grid: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """The decoder's peak activation memory for one image of a `grid` of codes, estimated.

    A residual block at the widest level (channels x pixels) holds about six tensors of that level's size at once
    (its input, two norms and activations, a convolution's output); LlamaGen's VQ-16 at 256 px: 6 x 128 x 256 x 256
    x 4 B = 201 MB in fp32, the figure a source review of its decoder gives (~205 MB).
    """
    levels = len(cfg.decoder_ch_mult)
    widest = max(cfg.ch * m * grid[0] * grid[1] * 4 ** (levels - 1 - i) for i, m in enumerate(cfg.decoder_ch_mult))
    return 6 * widest * torch.empty((), dtype=dtype).element_size()


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)  # x·sigmoid(x), fused


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions (1×1 conv projections)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as the original
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, kind: str) -> nn.Module:
    level = nn.Module()
    level.res = nn.ModuleList(res)
    level.attn = nn.ModuleList(attn)
    if resample is not None:
        setattr(level, kind, resample)
    return level


def _middle(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, groups, dropout),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, groups, dropout),
        ]
    )


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult, nres = cfg.norm_groups, cfg.ch, cfg.encoder_ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, cin = [], ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            res, attn = [], []
            for _ in range(nres):
                res.append(ResnetBlock(cin, ch * m, g, cfg.dropout_p))
                cin = ch * m
                if last:  # attention only at the deepest level
                    attn.append(AttnBlock(cin, g))
            levels.append(_level(res, attn, None if last else Downsample(cin), "downsample"))
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _middle(cin, g, cfg.dropout_p)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, ch, mult, nres = cfg.norm_groups, cfg.ch, cfg.decoder_ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _middle(cin, g, cfg.dropout_p)
        levels = []
        for i in reversed(range(len(mult))):
            res, attn = [], []
            for _ in range(nres + 1):
                res.append(ResnetBlock(cin, ch * mult[i], g, cfg.dropout_p))
                cin = ch * mult[i]
                if i == len(mult) - 1:
                    attn.append(AttnBlock(cin, g))
            levels.append(_level(res, attn, Upsample(cin) if i != 0 else None, "upsample"))
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by cosine similarity (both sides L2-normalised), straight-through gradients."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.beta = cfg.commit_loss_beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.codebook_show_usage:
            # LlamaGen keeps the last 65536 code indices here; it is part of the checkpoint format.
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) → nearest code (B, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        book = self.codebook()
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()
        return dist.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) → quantised latents (B, C, h, w)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        codes = self.indices(z)
        zq = self.lookup(codes)
        zn = F.normalize(z, dim=1) if self.l2_norm else z
        codebook_loss = F.mse_loss(zq, zn.detach())
        commit_loss = self.beta * F.mse_loss(zn, zq.detach())
        zq = zn + (zq - zn).detach()  # straight-through estimator
        return zq, codes, codebook_loss, commit_loss


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) → codes (B, H/ds, W/ds), int64."""
        return self.quantize.indices(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) → images in [-1, 1] (B, 3, h·ds, w·ds) (clamped)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes.long()))).clamp(-1, 1)

    @torch.no_grad()
    def decode_in_chunks(self, codes: torch.Tensor, chunk: int, bf16: bool = False) -> torch.Tensor:
        """`decode_codes` of at most `chunk` grids at a time: the decoder's full-resolution activations
        (`decode_bytes_per_image`, ~200 MB per 256-px image) exist for one chunk, not for a sampler's whole batch.
        `bf16`: under bf16 autocast (its convolutions in bf16: about as long as GPT-B's generation in fp32 on a
        GPU, ~240 GFLOP per 256-px image), the output in fp32."""
        with torch.autocast(codes.device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
            return torch.cat([self.decode_codes(part).float() for part in codes.split(max(1, int(chunk)))])

    def forward(self, x: torch.Tensor):
        """Reconstruction and the quantiser's losses, for fitting."""
        zq, codes, codebook_loss, commit_loss = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(zq)), codes, codebook_loss, commit_loss
