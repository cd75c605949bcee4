"""Resuming a run on another number of ranks: DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer partition per rank, so it loads only on the
world size that wrote it. `npp train convert --run RUN` turns the latest checkpoint
into DeepSpeed's universal format (one folder per parameter: fp32 weights and Adam
moments, any partitioning) with `deepspeed.checkpoint.ds_to_universal`, and points
`latest` at it; the next start on any world size loads it with
`"checkpoint": {"load_universal": true}` (set by the trainer when `latest` is one).
The data position is rebased by the trainer (see Trainer._data_position).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from npp.train.checkpointing import is_universal, latest_tag, saved_world_size
from npp.train.errors import TrainingError

SUFFIX = "_universal"


def convert(run: str) -> str:
    """Convert RUN's latest checkpoint to the universal format; returns the new tag."""
    ckpt_dir = Path(run) / "checkpoints"
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise TrainingError(f"{ckpt_dir} has no complete checkpoint (no `latest`): nothing to convert")
    if is_universal(ckpt_dir / tag):
        print(f"{ckpt_dir / tag} is already a universal checkpoint: start the run on any number of ranks")
        return tag
    out = ckpt_dir / f"{tag}{SUFFIX}"
    tmp = ckpt_dir / f"{tag}{SUFFIX}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "2"]
    print(f"converting {ckpt_dir / tag} (saved by {saved_world_size(ckpt_dir / tag)} ranks) to {out}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TrainingError(f"ds_to_universal failed on {ckpt_dir / tag}:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    latest_tmp = ckpt_dir / f"latest.tmp{os.getpid()}"
    latest_tmp.write_text(out.name)
    os.replace(latest_tmp, ckpt_dir / "latest")
    print(f"{out.name} is now latest: rerun the same training command with any number of ranks")
    return out.name
