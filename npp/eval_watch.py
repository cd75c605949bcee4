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
    from npp.pipeline.mlflow_utils import log_metrics_once, tracking_uri
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
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    done, pending = set(state.get("done", [])), dict(state.get("pending", {}))
    mlflow.set_tracking_uri(tracking_uri())
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    evaluated = []
    model = GPT(model_cfg).to(device).eval()  # one model, reloaded per checkpoint: the evaluator's sampler stays

    def save_state():
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps({"done": sorted(done), "pending": pending}))
        tmp.replace(state_file)

    def send_pending():
        """Metrics computed but not yet in MLflow (it did not answer): sent once it does, each point once."""
        for tag, rec in sorted(pending.items()):
            try:
                log_metrics_once(mlflow.tracking.MlflowClient(), run_id, rec["metrics"], rec["step"])
            except Exception as e:
                print(f"eval watch: warning: MLflow at {tracking_uri()} did not take the metrics of {tag} "
                      f"({type(e).__name__}); kept in {state_file}, sent at the next try", flush=True)
                return
            del pending[tag]
            done.add(tag)
            save_state()

    while True:
        send_pending()
        for tag in [t for t in _complete_tags(ckpt_dir) if t not in done and t not in pending]:
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
            print(f"eval watch {tag}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            pending[tag] = {"step": step, "metrics": metrics}  # kept before it is sent: never computed twice
            save_state()
            evaluated.append(step)
            send_pending()
        finished = (run_dir / "model.pt").exists() and not [t for t in _complete_tags(ckpt_dir) if t not in done]
        if once or finished:
            if pending:
                raise NppError(f"MLflow at {tracking_uri()} did not take the metrics of {sorted(pending)}; they are "
                               f"kept in {state_file}: rerun the same command when it answers")
            return evaluated
        time.sleep(interval)
