"""A shrunken `make demo`: every stage through the same code, minutes on CPU; checks every artefact."""

import json

import mlflow
import numpy as np
import pytest

from npp.demo import Demo, DemoConfig
from npp.models.checkpoint import load_gpt
from npp.pipeline.shards import load_manifest, read_meta


@pytest.mark.slow
def test_shrunken_demo_produces_consistent_artefacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DemoConfig(out=str(tmp_path / "demo"), per_class=12, vq_minutes=0.5, vq_steps=25, classifier_epochs=1,
                     model="GPT-Nano", epochs=2, global_batch=16, samples_per_class=2, check_quality=False)
    result = Demo(cfg).run()
    out = tmp_path / "demo"

    meta = read_meta(out / "shards")
    manifest = load_manifest(out / "shards")
    assert meta["complete"] and meta["samples"] == 120 and meta["failures"] == 0
    assert len(manifest) == meta["num_shards"] == 2 and sum(m["samples"] for m in manifest) == 120

    model, ckpt = load_gpt(out / "runs" / "npp" / "model.pt")
    assert ckpt["steps"] == 2 * (120 // 16) and ckpt["train"]["schedule"] == "4:0.25,2:0.25,1:0.5"
    assert model.config.vocab_size == 512 and model.config.grid == (8, 8)

    z = np.load(result["trained"]["samples"])
    assert z["arr_0"].shape == (20, 32, 32, 3) and np.bincount(z["labels"]).tolist() == [2] * 10

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run_id = (out / "runs" / "npp" / "mlflow_run_id").read_text()
    metrics = client.get_run(run_id).data.metrics
    for key in ("loss", "train_flops", "fid_toynet", "is_toynet", "precision_toynet", "recall_toynet",
                "class_accuracy_toynet"):
        assert key in metrics, key
    assert client.get_metric_history(run_id, "fid_toynet")[0].step == ckpt["steps"]
    saved = json.loads((out / "demo_result.json").read_text())
    assert saved["untrained"]["metrics"]["fid_toynet"] > 0

    # a rerun reuses the toy set, tokenizer, shards, classifier and reference
    stamp = {p: (out / p).stat().st_mtime_ns for p in ("vq_toy.pt", "toynet.pt", "ref_toynet.npz", "shards/meta.json")}
    Demo(cfg).prepare()
    assert stamp == {p: (out / p).stat().st_mtime_ns for p in stamp}
