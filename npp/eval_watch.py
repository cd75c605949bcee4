"""`npp eval watch`: evaluate a run's checkpoints as they appear, outside the training job.

For users who do not want sampling inside a GPU allocation: the same evaluation as
`npp train --eval-every` (npp.eval.during_training: fixed class-balanced labels and
seeds), on each new complete checkpoint once, logged into the run's MLflow run at the
checkpoint's step beside its training FLOPs. Resumable: the evaluated tags are kept in
`RUN/eval_watch.json`. Like cli.py and demo.py this module wires two stages (train's
checkpoints, eval's evaluator); no stage imports another.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from npp.errors import NppError


def _complete_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags up to `latest` (a tag past it may still be being written)."""
    from npp.train.checkpointing import TAG_PREFIX, latest_tag
    from npp.train.export import tag_step

    latest = latest_tag(ckpt_dir)
    if latest is None:
        return []
    last = tag_step(latest)
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
            and not p.name.endswith(("_universal", ".tmp"))]
    return sorted(t for t in tags if tag_step(t) <= last)


def watch(run: str, vq: str, ref: str, inception: Optional[str] = None, classifier: Optional[str] = None,
          per_class: int = 10, cfg_scale: float = 2.0, temperature: float = 1.0, top_k: int = 0, batch: int = 64,
          seed: int = 0, ema: bool = True, interval: float = 300.0, once: bool = False) -> list[int]:
    """Evaluate every not-yet-evaluated complete checkpoint of RUN; with once=False keep watching until the
    run has exported its final model. Returns the steps evaluated by this call."""
    import mlflow
    import torch

    from npp.eval.during_training import TrainingEvaluator
    from npp.models.configs import GPTConfig
    from npp.models.gpt import GPT
    from npp.pipeline.devices import pick_device
    from npp.train.export import consolidated_state, tag_step

    run_dir = Path(run)
    ckpt_dir = run_dir / "checkpoints"
    if not (run_dir / "config.json").exists() or not (run_dir / "mlflow_run_id").exists():
        raise NppError(f"{run} is not a training run with an MLflow run (no config.json / mlflow_run_id): pass --run RUN")
    config = json.loads((run_dir / "config.json").read_text())
    model_cfg = GPTConfig.from_dict(config["model_config"])
    evaluator = TrainingEvaluator(vq=vq, ref=ref, inception=inception, classifier=classifier, per_class=per_class,
                                  cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, batch=batch, seed=seed)
    device = pick_device("auto")
    state_file = run_dir / "eval_watch.json"
    done = set(json.loads(state_file.read_text())["done"]) if state_file.exists() else set()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    evaluated = []
    model = GPT(model_cfg).to(device).eval()  # one model, reloaded per checkpoint: the evaluator's sampler stays
    while True:
        for tag in [t for t in _complete_tags(ckpt_dir) if t not in done]:
            if not (ckpt_dir / tag).is_dir():  # pruned meanwhile (--keep)
                continue
            weights = None
            if ema and (ckpt_dir / tag / "ema.pt").exists():
                weights = torch.load(ckpt_dir / tag / "ema.pt", map_location="cpu", weights_only=True)["model"]
            model.load_state_dict(weights or consolidated_state(ckpt_dir, tag))
            step = tag_step(tag)
            metrics = evaluator(model, model_cfg.num_classes, device, 0, 1)
            client = ckpt_dir / tag / "client.json"
            if client.exists():
                metrics["train_flops"] = float(json.loads(client.read_text())["train_flops"])
            with mlflow.start_run(run_id=run_id):
                mlflow.log_metrics(metrics, step=step)
            print(f"eval watch {tag}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            done.add(tag)
            evaluated.append(step)
            tmp = state_file.with_name(state_file.name + ".tmp")
            tmp.write_text(json.dumps({"done": sorted(done)}))
            tmp.replace(state_file)
        if once or (run_dir / "model.pt").exists() and not [t for t in _complete_tags(ckpt_dir) if t not in done]:
            return evaluated
        time.sleep(interval)
