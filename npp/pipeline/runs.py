"""The run folder: every name and format under `npp train --out RUN`, in one place (docs/run-folder.md).

The trainer writes it; a resumed start, `npp train export` / `convert`, `npp eval watch` and
`npp eval` read it. Each of them goes through `RunFolder`, so a file is named once and a
checkpoint is "complete" by one rule: `checkpoints/latest` names it (written last,
atomically). Torch-free except `checkpoint_weights`; DeepSpeed's own files inside a checkpoint
are known to npp.pipeline.deepspeed_checkpoint only.
"""

from __future__ import annotations

import json
from pathlib import Path

from npp.pipeline import deepspeed_checkpoint
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
        """`npp eval watch`'s outbox (npp.runtime.outbox): each checkpoint's metrics, kept before they are sent."""
        return self.path / "eval_watch.jsonl"

    @property
    def eval_watch_before(self) -> Path:
        """What `npp eval watch` kept before its outbox ({"done": [tags], "pending": {tag: record}}), read once."""
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
        return deepspeed_checkpoint.is_universal(self.tag_dir(tag))

    def saved_world_size(self, tag: str) -> int:
        return len(list(self.tag_dir(tag).glob("rng_rank*.pt")))

    def client_state(self, tag: str) -> dict:
        """The trainer's counters of a checkpoint, in plain numbers (no GB-sized load)."""
        path = self.client_file(tag)
        return json.loads(path.read_text()) if path.exists() else {}


def checkpoint_weights(run: RunFolder, tag: str, ema: bool = True) -> dict:
    """The weights to sample a checkpoint with: its EMA when saved and asked for, else the consolidated model."""
    import torch

    if ema and run.ema_file(tag).exists():
        return torch.load(run.ema_file(tag), map_location="cpu", weights_only=True)["model"]
    return deepspeed_checkpoint.consolidated_state(run.checkpoints, tag)
