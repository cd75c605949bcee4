"""The run folder: every name and format under `npp train --out RUN`, in one place (docs/run-folder.md).

The trainer writes it; a resumed start, `npp train export` / `convert`, `npp eval watch` and
`npp eval` read it. Each of them goes through `RunFolder`, so a file is named once and a
checkpoint is "complete" by one rule: `checkpoints/latest` names it (written last,
atomically). Torch-free except `consolidated_state`, which gathers a checkpoint's weights
(DeepSpeed's zero_to_fp32 for ZeRO partitions).
"""

from __future__ import annotations

import json
from pathlib import Path

from npp.runtime.files import atomic_write_text

TAG_PREFIX = "step_"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


def tag_step(tag: str) -> int:
    """step_000001000 (or step_000001000_universal) -> 1000."""
    return int(tag[len(TAG_PREFIX):].split("_")[0])


class RunFolder:
    """Paths and small files of a run directory (see docs/run-folder.md)."""

    def __init__(self, path):
        self.path = Path(path)

    # --- files at the top ------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def ds_config(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def outbox(self) -> Path:
        return self.path / "mlflow_outbox.jsonl"

    @property
    def run_id_file(self) -> Path:
        return self.path / "mlflow_run_id"

    @property
    def stop_file(self) -> Path:
        return self.path / "STOP"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def eval_watch(self) -> Path:
        return self.path / "eval_watch.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def read_config(self) -> dict:
        return json.loads(self.config.read_text())

    def mlflow_run_id(self) -> str | None:
        return self.run_id_file.read_text().strip() if self.run_id_file.exists() else None

    def write_mlflow_run_id(self, run_id: str) -> None:
        atomic_write_text(self.run_id_file, run_id)

    # --- checkpoints -------------------------------------------------------------------
    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    def rng_file(self, tag: str, rank: int) -> Path:
        return self.tag_dir(tag) / f"rng_rank{rank}.pt"

    def ema_file(self, tag: str) -> Path:
        return self.tag_dir(tag) / "ema.pt"

    def client_file(self, tag: str) -> Path:
        return self.tag_dir(tag) / "client.json"

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint: the one `latest` names, when its directory exists."""
        path = self.checkpoints / "latest"
        if not path.exists():
            return None
        tag = path.read_text().strip()
        return tag if self.tag_dir(tag).is_dir() else None

    def set_latest(self, tag: str) -> None:
        atomic_write_text(self.checkpoints / "latest", tag)

    def tags(self) -> list[str]:
        """Every checkpoint directory, complete or not, in step order."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
                      and not p.name.endswith(".tmp"))

    def complete_tags(self) -> list[str]:
        """Checkpoints up to `latest` (a directory after it is a save still running, or one that failed)."""
        latest = self.latest_tag()
        return [t for t in self.tags() if latest is not None and t <= latest]

    def is_universal(self, tag: str) -> bool:
        """A checkpoint converted by `npp train convert` (DeepSpeed's universal format, any world size)."""
        d = self.tag_dir(tag)
        return (d / "zero").is_dir() and not list(d.glob("*optim_states.pt"))

    def saved_world_size(self, tag: str) -> int:
        return len(list(self.tag_dir(tag).glob("rng_rank*.pt")))

    def client_state(self, tag: str) -> dict:
        """The trainer's counters of a checkpoint, in plain numbers (no GB-sized load)."""
        path = self.client_file(tag)
        return json.loads(path.read_text()) if path.exists() else {}


def consolidated_state(run: RunFolder, tag: str) -> dict:
    """A checkpoint's full fp32 weights with LlamaGen's names: ZeRO partitions gathered by DeepSpeed's
    zero_to_fp32; without ZeRO the module states file holds them."""
    import torch

    from npp.models.checkpoint import strip_prefixes

    tag_dir = run.tag_dir(tag)
    if list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(run.checkpoints), tag=tag)
    else:  # our own file: DeepSpeed's module states pickle
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float().clone() for k, v in strip_prefixes(state).items()}


def checkpoint_weights(run: RunFolder, tag: str, ema: bool = True) -> dict:
    """The weights to sample a checkpoint with: its EMA when saved and asked for, else the consolidated model."""
    import torch

    if ema and run.ema_file(tag).exists():
        return torch.load(run.ema_file(tag), map_location="cpu", weights_only=True)["model"]
    return consolidated_state(run, tag)
