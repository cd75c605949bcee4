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

import subprocess
import sys

from npp.pipeline.runs import UNIVERSAL_SUFFIX, RunFolder
from npp.runtime.files import staged_dir
from npp.train.errors import TrainingError


def convert(run: str) -> str:
    """Convert RUN's latest checkpoint to the universal format; returns the new tag."""
    folder = RunFolder(run)
    tag = folder.latest_tag()
    if tag is None:
        raise TrainingError(f"{folder.checkpoints} has no complete checkpoint (no `latest`): nothing to convert")
    if folder.is_universal(tag):
        print(f"{folder.tag_dir(tag)} is already a universal checkpoint: start the run on any number of ranks")
        return tag
    out = folder.tag_dir(f"{tag}{UNIVERSAL_SUFFIX}")
    print(f"converting {folder.tag_dir(tag)} (saved by {folder.saved_world_size(tag)} ranks) to {out}", flush=True)
    with staged_dir(out) as staging:  # `latest` names it only once whole
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(folder.tag_dir(tag)), "--output_folder", str(staging), "--inject_missing_state",
                               "--num_extract_workers", "2", "--num_merge_workers", "2"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TrainingError(f"ds_to_universal failed on {folder.tag_dir(tag)}:\n{proc.stderr[-3000:]}")
    folder.set_latest(out.name)
    print(f"{out.name} is now latest: rerun the same training command with any number of ranks")
    return out.name
