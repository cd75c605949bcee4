"""`npp eval watch`: evaluate a run's checkpoints as they appear, outside the training job.

For users who do not want sampling inside a GPU allocation: the same evaluation as
`npp train --eval-every` (npp.eval.during_training, from the same EvalSpec: fixed
class-balanced labels and seeds), on each new complete checkpoint once, logged into the
run's MLflow run at the checkpoint's step beside its training FLOPs. It reads the run
folder through its contract (npp.pipeline.runs), not through the train stage. Resumable:
the evaluated tags, and metrics MLflow has not taken yet, are kept in RUN/eval_watch.json.
"""

from __future__ import annotations

import json
import time

from npp.eval.config import WatchConfig
from npp.eval.reference import EvalInputError
from npp.pipeline.runs import RunFolder, tag_step
from npp.runtime.files import atomic_write_text


def evaluable_tags(run: RunFolder) -> list[str]:
    """Complete checkpoints, without the universal copies (the same weights as the tag they were made from)."""
    return [t for t in run.complete_tags() if not t.endswith("_universal")]


def watch(cfg: WatchConfig) -> list[int]:
    """Evaluate every not-yet-evaluated complete checkpoint of the run; unless --once keep watching until the
    run has exported its final model. Returns the steps evaluated by this call."""
    import mlflow
    from mlflow.entities import RunTag

    from npp.eval.during_training import TrainingEvaluator
    from npp.models.configs import GPTConfig
    from npp.models.gpt import GPT
    from npp.pipeline.eval_spec import protocol_tags
    from npp.pipeline.runs import checkpoint_weights
    from npp.runtime.devices import pick_device
    from npp.runtime.metric_names import for_mlflow
    from npp.runtime.mlflow_utils import log_metrics_once, tracking_uri

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
    state = json.loads(run.eval_watch.read_text()) if run.eval_watch.exists() else {}
    done, pending = set(state.get("done", [])), dict(state.get("pending", {}))
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    evaluated = []
    model = GPT(model_cfg).to(device).eval()  # one model, reloaded per checkpoint: the evaluator's sampler stays

    def save_state():
        atomic_write_text(run.eval_watch, json.dumps({"done": sorted(done), "pending": pending}))

    def send_pending():
        """Metrics computed but not yet in MLflow (it did not answer): sent once it does, each point once."""
        for tag, rec in sorted(pending.items()):
            try:
                log_metrics_once(client, run_id, for_mlflow(rec["metrics"], naming), rec["step"])
                if rec.get("tags"):  # the FIDs' protocol, as the trainer tags its own
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
            except Exception as e:
                print(f"eval watch: warning: MLflow at {tracking_uri()} did not take the metrics of {tag} "
                      f"({type(e).__name__}); kept in {run.eval_watch}, sent at the next try", flush=True)
                return
            del pending[tag]
            done.add(tag)
            save_state()

    while True:
        send_pending()
        for tag in [t for t in evaluable_tags(run) if t not in done and t not in pending]:
            if not run.tag_dir(tag).is_dir():  # pruned meanwhile (--keep)
                continue
            model.load_state_dict(checkpoint_weights(run, tag, ema=cfg.ema))
            step = tag_step(tag)
            metrics = evaluator(model, model_cfg.num_classes, device, 0, 1)
            flops = run.client_state(tag).get("train_flops")
            if flops is not None:
                metrics["train_flops"] = float(flops)
            print(f"eval watch {tag}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            pending[tag] = {"step": step, "metrics": metrics,  # kept before it is sent: never computed twice
                            "tags": protocol_tags(evaluator.protocol, metrics)}
            save_state()
            evaluated.append(step)
            send_pending()
        finished = run.model.exists() and not [t for t in evaluable_tags(run) if t not in done]
        if cfg.once or finished:
            if pending:
                raise EvalInputError(f"MLflow at {tracking_uri()} did not take the metrics of {sorted(pending)}; they "
                                     f"are kept in {run.eval_watch}: rerun the same command when it answers")
            return evaluated
        time.sleep(cfg.interval)
