"""Export a run's checkpoint as one consolidated fp32 `.pt` in the LlamaGen checkpoint format.

`{"model": state_dict, "ema"?: state_dict, "config": GPTConfig dict, "steps": int, "train": {...}}`
with LlamaGen's parameter names, so `npp sample`, LlamaGen's and NPP's sampling
scripts all load it. ZeRO-1/2/3 partitions are gathered by DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from npp.models.checkpoint import strip_prefixes
from npp.train.checkpointing import TAG_PREFIX, latest_tag


def tag_step(tag: str) -> int:
    """step_000001000 (or step_000001000_universal) -> 1000."""
    return int(tag[len(TAG_PREFIX):].split("_")[0])


def consolidated_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    zero_files = list((ckpt_dir / tag).glob("*zero_pp_rank_*optim_states.pt"))
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # no ZeRO: the module states file holds the full weights (our own file)
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = states["module"]
    return {k: v.float().clone() for k, v in strip_prefixes(state).items()}


def export(run: str, tag: Optional[str] = None, out: Optional[str] = None) -> str:
    """Write `<run>/export/model_<tag>.pt` (and `<run>/model.pt`, the newest) from a checkpoint tag (default: latest)."""
    run_dir = Path(run)
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} in {ckpt_dir}: train first, or pass --tag")
    config = json.loads((run_dir / "config.json").read_text())
    ckpt = {
        "model": consolidated_state(ckpt_dir, tag),
        "config": config["model_config"],
        "steps": tag_step(tag),
        "train": {"schedule": config["schedule"], "run": str(run_dir.resolve()), "tag": tag,
                  "git_commit": config.get("git_commit"), "world_size": config.get("world_size")},
    }
    ema_file = ckpt_dir / tag / "ema.pt"
    if ema_file.exists():
        ckpt["ema"] = torch.load(ema_file, map_location="cpu", weights_only=True)["model"]
    target = Path(out) if out else run_dir / "export" / f"model_{tag}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, target)
    if not out:
        link = run_dir / "model.pt"
        tmp_link = run_dir / f"model.pt.tmp{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, run_dir), tmp_link)
        os.replace(tmp_link, link)
    print(f"exported {tag} of {run_dir} ({sum(v.numel() for v in ckpt['model'].values()):,} parameters) to {target}")
    return str(target)
