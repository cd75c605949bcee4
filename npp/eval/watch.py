"""`npp eval watch`: evaluate a run's checkpoints as they appear, outside the training job.

For users who do not want sampling inside a GPU allocation: the same evaluation as
`npp train --eval-every` (npp.eval.during_training, from the same EvalSpec: fixed
class-balanced labels and seeds), on each new complete checkpoint once, logged into the
run's MLflow run at the checkpoint's step beside its training FLOPs. It reads the run
folder through its contract (npp.pipeline.runs), not through the train stage. Resumable:
each checkpoint's metrics are kept in RUN/eval_watch.jsonl (npp.runtime.outbox) before they are
sent, so none is computed twice and MLflow gets each point once, whenever it answers.
"""

from __future__ import annotations

import json
import time

from npp.eval.config import WatchConfig
from npp.eval.reference import EvalInputError
from npp.pipeline.runs import RunFolder, tag_step
from npp.runtime.outbox import Delivery, Outbox


def evaluable_tags(run: RunFolder) -> list[str]:
    """Complete checkpoints, without the universal copies (the same weights as the tag they were made from)."""
    return [t for t in run.complete_tags() if not t.endswith("_universal")]


def watch(cfg: WatchConfig) -> list[int]:
    """Evaluate every not-yet-evaluated complete checkpoint of the run; unless --once keep watching until the
    run has exported its final model. Returns the steps evaluated by this call."""
    import mlflow

    from npp.eval.during_training import TrainingEvaluator
    from npp.models.configs import GPTConfig
    from npp.models.gpt import GPT
    from npp.pipeline.eval_spec import protocol_tags
    from npp.pipeline.runs import checkpoint_weights
    from npp.runtime.devices import pick_device
    from npp.runtime.metric_names import for_mlflow
    from npp.runtime.mlflow_utils import tracking_uri

    run = RunFolder(cfg.run)
    run_id = run.mlflow_run_id()
    if not run.config.exists() or run_id is None:
        raise EvalInputError(f"{cfg.run} is not a training run with an MLflow run (no {run.config.name} / "
                             f"{run.run_id_file.name}): pass --run RUN")
    config = run.read_config()
    model_cfg = GPTConfig.from_dict(config["model_config"])
    naming = int(config.get("mlflow_names", 1))  # as the trainer names the run's points (npp.runtime.metric_names)
    evaluator = TrainingEvaluator(cfg)
    device = pick_device("auto")
    outbox = Outbox(run.eval_watch)
    _take_over_the_state_before(run, outbox)
    mlflow.set_tracking_uri(tracking_uri())
    delivery = Delivery(mlflow.tracking.MlflowClient(), run_id)
    evaluated = []
    model = GPT(model_cfg).to(device).eval()  # one model, reloaded per checkpoint: the evaluator's sampler stays

    records = outbox.records()  # this process is the outbox's one writer: read once, then kept up to date here

    def send_outbox() -> bool:
        """Every kept record whose points MLflow lacks, sent (each point once); False when it did not answer."""
        try:
            for rec in records:
                delivery.send(rec, rename=lambda metrics: for_mlflow(metrics, naming))
            return True
        except Exception as e:  # noqa: BLE001 - any failure of the tracking side: the records stay for the next try
            print(f"eval watch: warning: MLflow at {tracking_uri()} did not take every evaluation "
                  f"({type(e).__name__}); they are kept in {run.eval_watch}, sent at the next try", flush=True)
            return False

    while True:
        sent = send_outbox()
        done = {rec.get("checkpoint") for rec in records}  # evaluated: kept, so never computed twice
        for tag in [t for t in evaluable_tags(run) if t not in done]:
            if not run.tag_dir(tag).is_dir():  # pruned meanwhile (--keep)
                continue
            model.load_state_dict(checkpoint_weights(run, tag, ema=cfg.ema))
            metrics = evaluator(model, model_cfg.num_classes, device, 0, 1)
            flops = run.client_state(tag).get("train_flops")
            if flops is not None:
                metrics["train_flops"] = float(flops)
            print(f"eval watch {tag}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            # kept before it is sent; its tags say the FIDs' protocol, as the trainer tags its own
            records.append(outbox.append(tag_step(tag), metrics, protocol_tags(evaluator.protocol, metrics),
                                         checkpoint=tag))
            done.add(tag)
            evaluated.append(tag_step(tag))
            sent = send_outbox()
        finished = run.model.exists() and not [t for t in evaluable_tags(run) if t not in done]
        if cfg.once or finished:
            if not sent:
                raise EvalInputError(f"MLflow at {tracking_uri()} did not take every evaluation; they are kept in "
                                     f"{run.eval_watch}: rerun the same command when it answers")
            return evaluated
        time.sleep(cfg.interval)


def _take_over_the_state_before(run: RunFolder, outbox: Outbox) -> None:
    """A run watched by an npp before the outbox: its evaluated tags and pending metrics go into the outbox
    (a tag it had sent as an empty record, so it is not evaluated again), then its file is removed."""
    old = run.eval_watch_before
    if not old.exists():
        return
    state = json.loads(old.read_text())
    pending = state.get("pending", {})
    for tag in sorted(set(state.get("done", [])) - set(pending)):
        outbox.append(tag_step(tag), {}, checkpoint=tag)
    for tag, rec in sorted(pending.items()):
        outbox.append(rec["step"], rec["metrics"], rec.get("tags"), checkpoint=tag)
    old.unlink()
