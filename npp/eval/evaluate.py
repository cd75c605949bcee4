"""`npp eval`: metrics of sample files against a reference, logged into the training run in MLflow.

Metric names carry the feature network (`fid` for Inception, `fid_toynet` for the
toy classifier); in a cfg sweep (several sample files) the training run gets one
key per scale (`fid_toynet_cfg2`), and every evaluation also gets a nested MLflow
run holding the sampling settings, the reference and network identity, the
metrics and the PNG grid, so a FID can be traced to everything that changed it.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

from npp.eval.features import extract, load_feature_net, metric_suffix
from npp.eval.metrics import frechet_distance, gaussian_stats, inception_score, precision_recall
from npp.eval.reference import EvalInputError, load_npz, reference_for
from npp.pipeline.eval_spec import fid_protocol, protocol_tags
from npp.pipeline.runs import RunFolder
from npp.runtime.files import atomic_write_text, file_sha256, npp_version
from npp.runtime.mlflow_utils import EXPERIMENT


def sample_files(samples: str) -> list[str]:
    files = []
    for part in str(samples).split(","):
        matches = sorted(glob.glob(part.strip()))
        if not matches:
            raise EvalInputError(f"samples file {part.strip()} does not exist: make it with `npp sample`")
        files += matches
    return files


def compute_metrics(net, samples_path: str, ref: dict, ref_path: str) -> dict[str, float]:
    data = load_npz(samples_path, "samples")
    if "arr_0" not in data:
        raise EvalInputError(f"samples file {samples_path} has no arr_0 (uint8 N×H×W×3 images): make it with "
                             "`npp sample`")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EvalInputError(f"{samples_path}: arr_0 must be uint8 N×H×W×3, got {images.dtype} {images.shape}")
    if images.shape[1] != ref["image_size"]:
        raise EvalInputError(
            f"samples {samples_path} are {images.shape[1]}px but reference {ref_path} was made at "
            f"{ref['image_size']}px: "
            "make the reference at the samples' size (`npp eval ref --image-size ...`)"
        )
    for need, what in ((4, "precision/recall with k=3"),):
        if len(images) < need:
            raise EvalInputError(f"{samples_path} has {len(images)} samples, too few for {what}: sample at least "
                                 f"{need}")
    feats = extract(net, images, desc=f"features {Path(samples_path).name}")
    return metrics_from_features(net, feats, ref, data.get("labels"))


def metrics_from_features(net, feats: dict, ref: dict, labels=None) -> dict[str, float]:
    """FID, sFID, IS (ADM's parts of 5,000), precision/recall and, with a classifier, class accuracy."""
    mu, sigma = gaussian_stats(feats["pool"])
    mu_s, sigma_s = gaussian_stats(feats["spatial"])
    precision, recall = precision_recall(ref["features"], feats["pool"], k=3)
    sfx = metric_suffix(net)
    metrics = {
        f"fid{sfx}": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        f"sfid{sfx}": frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
        f"is{sfx}": inception_score(feats["logits"]),
        f"precision{sfx}": precision,
        f"recall{sfx}": recall,
    }
    if net.name != "inception" and labels is not None:
        # share of samples the classifier puts in the class they were conditioned on
        metrics[f"class_accuracy{sfx}"] = float((feats["logits"].argmax(1) == np.asarray(labels)).mean())
    return metrics


def evaluate(
    samples: str,
    ref: str,
    run_id: str | None = None,
    ckpt: str | None = None,
    inception: str | None = None,
    classifier: str | None = None,
    experiment: str = EXPERIMENT,
    log: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per samples file; logged to MLflow (the training run of --run-id or of --ckpt)."""
    files = sample_files(samples)
    net = load_feature_net(inception, classifier)
    reference = reference_for(net, ref)
    ref_sha = file_sha256(ref)
    results = {}
    for f in files:
        key = _cache_key(f, ref_sha, net)
        cached = _read_cache(f, key)
        results[f] = cached if cached is not None else compute_metrics(net, f, reference, ref)
        if cached is None:
            _write_cache(f, key, results[f], provenance(_sidecar(f), ref_sha, net))
    for f, m in results.items():
        print(f"{f}: " + "  ".join(f"{k}={v:.4f}" for k, v in m.items()))
    if log:
        try:
            log_to_mlflow(results, ref, net, run_id, ckpt, experiment)
        except Exception as e:  # the metrics are computed and kept: losing them to a tracking outage is not an option
            from npp.runtime.mlflow_utils import tracking_uri

            kept = ", ".join(str(_cache_path(f)) for f in results)
            raise EvalInputError(
                f"MLflow at {tracking_uri()} did not take the metrics ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); they are kept in {kept}: rerun the same command "
                "when it answers (nothing is recomputed, and nothing already logged is logged twice)") from None
    return results


def _cache_path(samples_path: str) -> Path:
    return Path(samples_path).with_suffix(".metrics.json")


def _cache_key(samples_path: str, ref_sha256: str, net) -> dict:
    """What the metrics of a samples file depend on: the file, the reference (by content), the feature network."""
    st = os.stat(samples_path)
    return {"samples": {"path": os.path.abspath(samples_path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
            "reference_sha256": ref_sha256, "feature_net": net.name,
            "feature_net_sha256": getattr(net, "weights_sha256", "")}


def provenance(record: dict, ref_sha256: str, net) -> dict:
    """Everything a FID depends on, in one record: how the samples were made (the samples' JSON record: checkpoint
    and its SHA-256 and step, EMA, guidance scale and interval, temperature, top-k/p, labels and seed, count, image
    size, precision, batch, ranks, device, the VQ's SHA-256, npp's version), and how they were scored (the
    reference's SHA-256, the feature network and its weights' SHA-256, npp's version and the device here)."""
    import torch

    made = {k: v for k, v in record.items() if k not in ("ckpt_train", "seconds", "grid_classes", "grid_per_class")}
    return {"samples": made, "reference_sha256": ref_sha256, "feature_net": net.name,
            "feature_net_sha256": getattr(net, "weights_sha256", ""), "eval_npp": npp_version(),
            "eval_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _read_cache(samples_path: str, key: dict) -> dict | None:
    path = _cache_path(samples_path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("key") != key:
        return None
    print(f"{samples_path}: metrics from {path} (same samples, reference and network)")
    return saved["metrics"]


def _write_cache(samples_path: str, key: dict, metrics: dict, provenance: dict) -> None:
    atomic_write_text(_cache_path(samples_path), json.dumps({"key": key, "metrics": metrics,
                                                             "provenance": provenance}, indent=2, default=str))


def _sidecar(samples_path: str) -> dict:
    path = Path(samples_path).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def _training_run(run_id: str | None, ckpt: str | None, records: list[dict]) -> tuple[str | None, int | None]:
    """The MLflow run and step to log at: explicit, else the run recorded with the samples or the checkpoint."""
    steps = next((r.get("ckpt_steps") for r in records if r.get("ckpt_steps") is not None), None)
    train = next((r.get("ckpt_train") for r in records if r.get("ckpt_train")), None)
    if ckpt and (steps is None or train is None):
        # The samples' JSON record already names their checkpoint's step and run; reading a
        # multi-GB checkpoint is only the fallback for samples made elsewhere.
        from npp.models.checkpoint import read_checkpoint

        c = read_checkpoint(ckpt)
        steps, train = c.get("steps", steps), c.get("train", train)
    if run_id is None and train and train.get("run"):
        run_id = RunFolder(train["run"]).mlflow_run_id()
    return run_id, int(steps) if steps is not None else None


def log_to_mlflow(results: dict, ref_path: str, net, run_id: str | None, ckpt: str | None, experiment: str) -> None:
    """Into the training run at the checkpoint's step, plus a nested run per samples file. Idempotent: a rerun
    after an interrupted logging reuses the nested runs made and sends no metric point twice."""
    import mlflow

    from npp.runtime.metric_names import for_mlflow, naming_of
    from npp.runtime.mlflow_utils import flatten, mark_training_experiment, tracking_uri
    from npp.runtime.outbox import Delivery

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    records = [_sidecar(f) for f in results]
    run_id, step = _training_run(run_id, ckpt, records)
    step = step or 0
    sweep = len(results) > 1
    standalone = not run_id  # samples of no training run: a run of their own, ended here
    if standalone:
        exp = mark_training_experiment(experiment)
        run_id = _named_run(client, exp, f"eval {Path(next(iter(results))).stem}", parent=None)
    training = client.get_run(run_id)
    exp = training.info.experiment_id
    naming = naming_of(training.data.metrics)  # the FIDs where the run's charts show its results (Results/...)
    ref_sha = file_sha256(ref_path)
    training_run = Delivery(client, run_id)  # one per run: each key's history read once, not once per file
    for (path, metrics), record in zip(results.items(), records, strict=False):
        scale = record.get("cfg_scale")
        key_suffix = f"_cfg{scale:g}" if sweep and scale is not None else ""
        protocol = samples_protocol(record, ref_sha, net)
        keyed = {k + key_suffix: v for k, v in metrics.items()}
        # what the FID depends on, tagged beside it (npp.pipeline.eval_spec); each point once (npp.runtime.outbox)
        training_run.send({"step": step, "metrics": for_mlflow(keyed, naming), "tags": protocol_tags(protocol, keyed)})
        grid = Path(path).with_suffix(".png")
        nested = _named_run(client, exp, f"eval step {step} cfg {scale}", parent=run_id)
        params = flatten({
            "samples": str(path), "reference": ref_path, "reference_sha256": ref_sha, "feature_net": net.name,
            "feature_net_sha256": getattr(net, "weights_sha256", ""), "step": step, "eval_npp": npp_version(),
            "sampling": {k: v for k, v in record.items() if k not in ("ckpt_train", "seconds")},
            "protocol": protocol or {},
        })
        have = client.get_run(nested).data.params
        for k, v in params.items():
            if k not in have:
                client.log_param(nested, k, v)
        Delivery(client, nested).send({"step": step, "metrics": for_mlflow(metrics, naming)})
        if grid.exists():
            client.log_artifact(nested, str(grid), artifact_path="samples")
            client.log_artifact(run_id, str(grid), artifact_path=f"samples/step_{step}")
        client.set_terminated(nested)
    if standalone:
        client.set_terminated(run_id)
    print(f"logged to MLflow run {run_id} at step {step}")


def samples_protocol(record: dict, reference_sha256: str, net) -> dict | None:
    """The protocol (npp.pipeline.eval_spec.fid_protocol) of a samples file from its JSON record; None for samples
    made elsewhere (no record)."""
    if not record:
        return None
    balanced = record.get("labels", "balanced") == "balanced"
    per_class = record.get("per_class") if balanced else record.get("count")
    return fid_protocol(per_class or 0, record.get("cfg_scale", 1.0), record.get("temperature", 1.0),
                        record.get("top_k", 0), reference_sha256, net.name, getattr(net, "weights_sha256", ""),
                        record.get("top_p", 1.0), record.get("cfg_interval", -1), record.get("labels", "balanced"))


def _named_run(client, experiment_id: str, name: str, parent: str | None) -> str:
    """The run of that name (nested under `parent`) made by an earlier try, or a new one."""
    parent_filter = f" and tags.mlflow.parentRunId = '{parent}'" if parent else ""
    found = client.search_runs([experiment_id], filter_string=f"tags.mlflow.runName = '{name}'{parent_filter}",
                               max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"mlflow.parentRunId": parent} if parent else {}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
