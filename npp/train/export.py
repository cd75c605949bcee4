"""Export a run's checkpoint as one consolidated fp32 `.pt` in the LlamaGen checkpoint format.

`{"model": state_dict, "ema"?: state_dict, "config": GPTConfig dict, "steps": int, "train": {...}}`
with LlamaGen's parameter names, so `npp sample`, LlamaGen's and NPP's sampling
scripts all load it. ZeRO-1/2/3 partitions are gathered by DeepSpeed's zero_to_fp32
(npp.pipeline.deepspeed_checkpoint.consolidated_state).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from npp.pipeline.deepspeed_checkpoint import consolidated_state
from npp.pipeline.runs import RunFolder, tag_step
from npp.runtime.files import atomic_path, atomic_symlink


def export(run: str, tag: str | None = None, out: str | None = None) -> str:
    """Write `RUN/export/model_<tag>.pt` (and `RUN/model.pt`, the newest) from a checkpoint tag (default: latest)."""
    folder = RunFolder(run)
    tag = tag or folder.latest_tag()
    if tag is None or not folder.tag_dir(tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} in {folder.checkpoints}: train first, or pass "
                                "--tag")
    config = folder.read_config()
    ckpt = {
        "model": consolidated_state(folder.checkpoints, tag),
        "config": config["model_config"],
        "steps": tag_step(tag),
        "train": {"schedule": config["schedule"], "run": str(folder.path.resolve()), "tag": tag,
                  "git_commit": config.get("git_commit"), "world_size": config.get("world_size")},
    }
    if folder.ema_file(tag).exists():
        ckpt["ema"] = torch.load(folder.ema_file(tag), map_location="cpu", weights_only=True)["model"]
    target = Path(out) if out else folder.export_dir / f"model_{tag}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        torch.save(ckpt, tmp)
    if not out:
        atomic_symlink(os.path.relpath(target, folder.path), folder.model)
    n = sum(v.numel() for v in ckpt["model"].values())
    print(f"exported {tag} of {folder.path} ({n:,} parameters) to {target}")
    return str(target)
