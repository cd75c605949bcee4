"""Loading model weights from LlamaGen-format checkpoints (ours, LlamaGen's, NPP's).

A checkpoint is `{"model": state_dict, "ema"?: state_dict, "config"?: dict, "steps"?: int}`
(some official files also carry "optimizer" and an argparse "args"); an FSDP or
DeepSpeed export may be a bare state dict. Keys may carry the `module.` prefix of
DDP/DeepSpeed or the `_orig_mod.` prefix of torch.compile.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from npp.errors import ConfigError, NppError

from .configs import GPT_SIZES, GPTConfig

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(NppError, ValueError):
    """The state dict does not fit the model; the message lists every offending name."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only (official LlamaGen files may hold an argparse Namespace)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
        raise CheckpointMismatchError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return dict(obj)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        out[name] = value
    return out


def extract_state_dict(ckpt: Mapping[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict: "ema" if asked (and present), else "model", "module" or the dict itself."""
    if use_ema:
        if "ema" not in ckpt or ckpt["ema"] is None:
            raise CheckpointMismatchError("this checkpoint has no 'ema' weights: load it without use_ema")
        state = ckpt["ema"]
    else:
        state = next((ckpt[k] for k in ("model", "module", "state_dict") if isinstance(ckpt.get(k), Mapping)), ckpt)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError("no tensors found in the checkpoint (expected weights under 'model')")
    return strip_prefixes(tensors)


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped tensor before failing."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                shown = names[:20] + ([f"... and {len(names) - 20} more"] if len(names) > 20 else [])
                lines.append(f"  {title} ({len(names)}): " + ", ".join(shown))
        lines.append(
            "Check the model size, vocab_size, num_classes and block_size, or use the checkpoint's own config."
        )
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def infer_gpt_config(state: Mapping[str, torch.Tensor], block_size: int = 256, **overrides: Any) -> GPTConfig:
    """A GPTConfig read off the tensor shapes of a LlamaGen-style state dict.

    Shapes fix dim, depth, vocabulary, classes and the FFN width; the head count is
    not visible in fused wqkv, so it comes from the size registry (or `n_head=`).
    """
    try:
        vocab, dim = state["tok_embeddings.weight"].shape
        cls_rows = state["cls_embedding.embedding_table.weight"].shape[0]
        hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
        qkv_rows = state["layers.0.attention.wqkv.weight"].shape[0]
    except KeyError as e:
        raise CheckpointMismatchError(f"not a LlamaGen GPT state dict: no tensor {e}") from None
    n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    n_head = overrides.pop("n_head", None)
    if n_head is None:
        match = [h for (L, h, d) in GPT_SIZES.values() if L == n_layer and d == dim]
        if not match:
            raise ConfigError(f"no registered size has {n_layer} layers of width {dim}: pass n_head explicitly")
        n_head = match[0]
    head_dim = dim // n_head
    n_kv_head = (qkv_rows // head_dim - n_head) // 2
    args: dict[str, Any] = dict(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=None if n_kv_head == n_head else n_kv_head,
        vocab_size=vocab,
        block_size=block_size,
    )
    # num_classes (+1 null row when trained with label dropout, as every c2i model is).
    class_dropout = overrides.get("class_dropout_prob", 0.1)
    args["num_classes"] = cls_rows - int(class_dropout > 0)
    cfg = GPTConfig.from_dict({**args, **overrides})
    if cfg.ffn_hidden != hidden:
        if hidden < int(8 * dim / 3):
            raise CheckpointMismatchError(
                f"FFN width {hidden} is below the SwiGLU default for dim {dim}: pass ffn_dim_multiplier explicitly"
            )
        # round_up(8·dim/3, hidden) == hidden whenever hidden >= 8·dim/3.
        cfg = GPTConfig.from_dict({**args, **overrides, "ffn_dim_multiplier": None, "multiple_of": hidden})
    return cfg


def load_gpt(
    path: str | os.PathLike,
    use_ema: bool = False,
    config: GPTConfig | None = None,
    **config_overrides: Any,
):
    """Build a GPT from a checkpoint file: its stored config, an explicit one, or one inferred from shapes."""
    from .gpt import GPT  # local import keeps this module usable for VQ checkpoints without the GPT

    ckpt = read_checkpoint(path)
    state = extract_state_dict(ckpt, use_ema=use_ema)
    if config is None:
        stored = ckpt.get("config")
        config = (
            GPTConfig.from_dict({**stored, **config_overrides})
            if isinstance(stored, Mapping)
            else infer_gpt_config(state, **config_overrides)
        )
    model = GPT(config)
    load_state_strict(model, state, source=os.fspath(path))
    return model, ckpt


def infer_vq_config(state: Mapping[str, torch.Tensor], **overrides: Any):
    """A VQConfig read off the tensor shapes of a LlamaGen-style VQ state dict."""
    from .vq import VQConfig

    if "quantize.embedding.weight" not in state or "encoder.conv_in.weight" not in state:
        raise CheckpointMismatchError(
            "not a VQ tokenizer state dict (no quantize.embedding.weight / encoder.conv_in.weight): pass LlamaGen's "
            "vq_ds16_c2i.pt or a checkpoint made by `npp tokenize fit-vq`"
        )
    size, dim = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]

    def mults(prefix: str) -> list[int]:
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{prefix}.conv_blocks.")})
        return [state[f"{prefix}.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels]

    enc, dec = mults("encoder"), mults("decoder")[::-1]  # the decoder stores its levels deepest first
    nres = len({k.split(".")[4] for k in state if k.startswith("encoder.conv_blocks.0.res.")})
    # GroupNorm has a weight per channel whatever the group count, so shapes cannot tell
    # the groups. LlamaGen's 32 is taken only where it divides every normalized width;
    # anywhere else guessing gives wrong codes silently (seen: 11.6% agreement).
    widths = {ch * m for m in enc + dec} | {ch}
    if "norm_groups" not in overrides and any(w % 32 for w in widths):
        raise CheckpointMismatchError(
            f"the checkpoint has no 'config' and its widths {sorted(widths)} are not all multiples of LlamaGen's 32 "
            "GroupNorm groups, so 'norm_groups' cannot be inferred: save it as "
            "{'model': state_dict, 'config': {..., 'norm_groups': G}} (checkpoints from `npp tokenize fit-vq` carry it)"
        )
    args = dict(
        codebook_size=size,
        codebook_embed_dim=dim,
        encoder_ch_mult=enc,
        decoder_ch_mult=dec,
        z_channels=state["encoder.conv_out.weight"].shape[0],
        ch=ch,
        num_res_blocks=nres,
        codebook_show_usage="quantize.codebook_used" in state,
        norm_groups=32,
    )
    return VQConfig.from_dict({**args, **overrides})


def load_vq(path: str | os.PathLike):
    """A VQModel from `{"model": state_dict}` (LlamaGen) or our `{"model", "config"}`; eval mode, CPU."""
    from .vq import VQConfig, VQModel

    ckpt = read_checkpoint(path)
    state = extract_state_dict(ckpt)
    if "tok_embeddings.weight" in state or "cls_embedding.embedding_table.weight" in state:
        raise CheckpointMismatchError(
            f"{os.fspath(path)} is a GPT checkpoint, not a VQ tokenizer: pass the tokenizer the shards were made with "
            "(LlamaGen's vq_ds16_c2i.pt, or a checkpoint from `npp tokenize fit-vq`)"
        )
    stored = ckpt.get("config")
    try:
        config = VQConfig.from_dict(dict(stored)) if isinstance(stored, Mapping) else infer_vq_config(state)
    except (CheckpointMismatchError, ValueError) as e:
        raise CheckpointMismatchError(f"{os.fspath(path)}: {e}") from None
    model = VQModel(config)
    load_state_strict(model, state, source=os.fspath(path))
    return model.eval(), ckpt
