import json
import os

import mlflow
import numpy as np
import pytest
import torch

from npp.errors import ConfigError
from npp.eval.config import FitClassifierConfig
from npp.eval.evaluate import evaluate
from npp.eval.features import load_feature_net
from npp.eval.fit_classifier import fit_classifier
from npp.eval.reference import EvalInputError, make_reference, real_images
from npp.eval.sample import SampleConfig, auto_batch, sample, samples_path
from npp.pipeline.toy import write_toy_dataset
from tests.helpers import make_gpt, save_small_vq


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_toy_dataset(str(root / "images"), per_class=6, size=32)
    save_small_vq(root / "vq.pt")
    gpt = make_gpt(vocab=64, num_classes=10)
    torch.save({"model": gpt.state_dict(), "config": gpt.config.to_dict(), "steps": 7}, root / "gpt.pt")
    fit_classifier(FitClassifierConfig(str(root / "images"), str(root / "toynet.pt"), epochs=1, batch=16))
    net = load_feature_net(classifier=str(root / "toynet.pt"))
    images, _ = real_images(str(root / "images"), None, 32)
    make_reference(net, images, str(root / "ref.npz"))
    return root


def _cfg(root, out, **kw):
    return SampleConfig(ckpt=str(root / "gpt.pt"), vq=str(root / "vq.pt"), out=str(out), per_class=2, batch=8,
                        cfg_scale="1.0,2.0", **kw)


def test_class_balanced_sweep_resume_and_ranks(setup, tmp_path, monkeypatch):
    out = tmp_path / "s"
    made = sample(_cfg(setup, out))
    assert len(made) == 2
    z = np.load(samples_path(out, 2.0))
    assert z["arr_0"].shape == (20, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert np.bincount(z["labels"]).tolist() == [2] * 10
    assert samples_path(out, 2.0).with_suffix(".png").exists()
    record = json.loads(samples_path(out, 2.0).with_suffix(".json").read_text())
    assert record["cfg_scale"] == 2.0 and record["ckpt_steps"] == 7 and record["labels"] == "balanced"
    assert not np.array_equal(np.load(samples_path(out, 1.0))["arr_0"], z["arr_0"])  # guidance changes samples
    # resume: a lost piece is made again, identically
    ref_images = z["arr_0"].copy()
    os.remove(out / "cfg2" / "piece_000001.npz")
    samples_path(out, 2.0).unlink()
    sample(_cfg(setup, out))
    assert np.array_equal(np.load(samples_path(out, 2.0))["arr_0"], ref_images)
    # two ranks make disjoint pieces; the last merges the same result
    ranked = tmp_path / "r"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        made = sample(_cfg(setup, ranked))
        assert len(made) == (0 if rank == 0 else 2)
    assert np.array_equal(np.load(samples_path(ranked, 2.0))["arr_0"], ref_images)


def test_samples_do_not_depend_on_the_batch_and_the_phases_are_timed(setup, tmp_path):
    """Batch 8 and batch 3 (7 pieces, the last padded) give the same images; the record says what each phase cost;
    a resumed run with another batch is refused (its pieces would be cut differently)."""
    a, b = tmp_path / "a", tmp_path / "b"
    sample(_cfg(setup, a, temperature=0.9))
    sample(SampleConfig(ckpt=str(setup / "gpt.pt"), vq=str(setup / "vq.pt"), out=str(b), per_class=2, batch=3,
                        cfg_scale="1.0,2.0", temperature=0.9))
    for scale in (1.0, 2.0):
        assert np.array_equal(np.load(samples_path(a, scale))["arr_0"], np.load(samples_path(b, scale))["arr_0"])
    record = json.loads(samples_path(b, 2.0).with_suffix(".json").read_text())
    assert record["batch"] == 3 and set(record["seconds"]) == {"generate", "decode", "write"}
    assert record["seconds"]["generate"] > 0
    os.remove(b / "cfg2" / "piece_000001.npz")
    with pytest.raises(ConfigError, match="--batch 3"):
        sample(_cfg(setup, b))
    # nor one with other sampling settings: the set would hold two kinds of samples
    with pytest.raises(ConfigError, match=r"other settings \(--precision fp32 -> bf16; --temperature 0.9 -> 1.0\)"):
        sample(SampleConfig(ckpt=str(setup / "gpt.pt"), vq=str(setup / "vq.pt"), out=str(b), per_class=2, batch=3,
                            cfg_scale="1.0,2.0", precision="bf16"))


def test_the_auto_batch_follows_free_memory_and_the_kv_cache_formula():
    from npp.models.configs import gpt_config
    from npp.models.generate import kv_cache_bytes

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    b = gpt_config("GPT-B", vocab_size=16384, block_size=256, num_classes=1000)
    assert auto_batch(b, torch.bfloat16, True, cpu, 50_000) == 64 and auto_batch(b, torch.float32, True, cpu, 10) == 10
    per_sample = kv_cache_bytes(b, 1, torch.bfloat16, True) + 2 * 4 * 16384 * 4
    assert auto_batch(b, torch.bfloat16, True, gpu, 50_000, free_bytes=100 * per_sample) == 80  # 0.8 of it
    assert auto_batch(b, torch.bfloat16, True, gpu, 50_000, free_bytes=10**12) == 256  # the cap
    assert auto_batch(b, torch.bfloat16, True, gpu, 20, free_bytes=10**12) == 16  # a multiple of 8 below the count
    xxl = gpt_config("GPT-XXL", vocab_size=16384, block_size=256, num_classes=1000)
    with pytest.raises(ConfigError, match="not even one sample"):
        auto_batch(xxl, torch.float32, True, gpu, 100, free_bytes=100 * 2**20)


def test_the_decode_runs_in_chunks_with_the_same_images(setup, tmp_path, monkeypatch):
    """The VQ decoder never sees more than DECODE_CHUNK grids at once, whatever the sampling batch: the decode's
    memory grows by a chunk, not by the batch; the images are those of a one-shot decode."""
    from npp.eval import sample as sample_module
    from npp.models.vq import VQModel

    whole = tmp_path / "whole"
    sample(_cfg(setup, whole))
    seen = []
    real = VQModel.decode_codes
    monkeypatch.setattr(VQModel, "decode_codes", lambda self, codes: seen.append(codes.shape[0]) or real(self, codes))
    monkeypatch.setattr(sample_module, "DECODE_CHUNK", 3)
    chunked = tmp_path / "chunked"
    sample(_cfg(setup, chunked))
    assert max(seen) == 3 and sum(seen) == 2 * 20  # 20 samples in pieces of 8, two scales
    for scale in (1.0, 2.0):
        one_shot, in_chunks = (np.load(samples_path(d, scale))["arr_0"] for d in (whole, chunked))
        assert np.array_equal(one_shot, in_chunks)


def test_the_decoder_estimate_and_the_auto_batch_that_sets_it_aside():
    from npp.eval.sample import DECODE_CHUNK
    from npp.models.configs import gpt_config
    from npp.models.generate import kv_cache_bytes
    from npp.models.vq import decode_bytes_per_image, vq_config

    per_image = decode_bytes_per_image(vq_config("VQ-16"), (16, 16))
    assert per_image == 6 * 128 * 256 * 256 * 4  # 201 MB for a 256-px image, the widest level at full resolution
    b = gpt_config("GPT-B", vocab_size=16384, block_size=256, num_classes=1000)
    per_sample = kv_cache_bytes(b, 1, torch.bfloat16, True) + 2 * 4 * 16384 * 4
    gpu = torch.device("cuda", 0)
    free = 100 * per_sample
    assert auto_batch(b, torch.bfloat16, True, gpu, 50_000, free_bytes=free, decode_bytes=int(0.4 * free)) == 40
    xxl = gpt_config("GPT-XXL", vocab_size=16384, block_size=256, num_classes=1000)
    with pytest.raises(ConfigError, match="beside the decoder"):  # the decode alone fills what is free
        auto_batch(xxl, torch.bfloat16, True, gpu, 100, free_bytes=DECODE_CHUNK * per_image,
                   decode_bytes=DECODE_CHUNK * per_image)


def test_ranks_agree_on_the_smallest_auto_batch_and_a_resumed_start_keeps_it(tmp_path, monkeypatch):
    from npp.eval.sample import agree_batch

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "s"
    with pytest.raises(ConfigError, match="1 of 2 ranks said their batch"):
        agree_batch(out, 64, timeout=0.3)  # rank 1 never starts
    (out / ".batch_rank1.json").write_text(json.dumps({"batch": 24}))  # rank 1, on a fuller GPU
    assert agree_batch(out, 64) == 24 and json.loads((out / "batch.json").read_text()) == {"batch": 24}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert agree_batch(out, 128) == 24  # a resumed start on another GPU cuts the pieces as before


def test_one_precision_and_one_switch_for_training_and_sampling():
    """npp.runtime.settings: auto is bf16 for sampling and bf16-mixed for training on CUDA, fp32 on the CPU; the
    sampler has no bf16-mixed; --compile's auto | on | off reads words and bools alike."""
    from npp.errors import UsageError
    from npp.runtime.settings import precision, switch, switched_on

    assert precision("auto", cuda=True, training=False) == "bf16"
    assert precision("auto", cuda=True, training=True) == "bf16-mixed"
    assert precision("auto", cuda=False, training=False) == precision("auto", cuda=False, training=True) == "fp32"
    assert precision("fp32", cuda=True, training=False) == "fp32"
    with pytest.raises(UsageError, match="--precision must be one of auto, bf16, fp32; got 'bf16-mixed'"):
        precision("bf16-mixed", cuda=True, training=False)
    assert [switch(v) for v in (True, False, "auto", "ON", "no")] == ["on", "off", "auto", "on", "off"]
    assert switched_on("auto", auto=True) and not switched_on("off", auto=True) and switched_on(True, auto=False)
    with pytest.raises(UsageError, match="--compile must be auto, on or off"):
        switch("sometimes")


def test_eval_keeps_its_metrics_through_a_tracking_outage_and_logs_each_once(setup, tmp_path, monkeypatch):
    """MLflow does not answer: the metrics are kept and the error names where; the rerun computes nothing again
    and logs them; a third run adds no point twice."""
    from npp.eval import evaluate as evaluate_module
    from npp.runtime.ranks import free_port

    out = tmp_path / "s"
    sample(_cfg(setup, out))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    args = (str(out / "samples_cfg*.npz"), str(setup / "ref.npz"))
    with pytest.raises(EvalInputError, match=r"did not take the metrics.*samples_cfg1\.metrics\.json.*rerun"):
        first = evaluate(*args, classifier=str(setup / "toynet.pt"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    computed = []
    real = evaluate_module.compute_metrics
    monkeypatch.setattr(evaluate_module, "compute_metrics", lambda *a: computed.append(a) or real(*a))
    first = evaluate(*args, classifier=str(setup / "toynet.pt"))
    again = evaluate(*args, classifier=str(setup / "toynet.pt"))
    assert computed == [] and first == again
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("npp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3  # the eval run and one nested run per cfg scale, reused by the rerun
    for run in runs:
        for key in run.data.metrics:
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
        assert run.info.status == "FINISHED"


def test_eval_logs_metrics_into_the_training_run(setup, tmp_path, monkeypatch):
    out = tmp_path / "s"
    sample(_cfg(setup, out))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("npp")
    with mlflow.start_run(run_name="train") as run:  # a training run's params as the trainer logs them
        mlflow.log_params({"train.model": "GPT-Nano", "schedule": "1:1", "total_steps": 7})
        mlflow.log_metric("train_flops", 1e12, step=7)
    results = evaluate(str(out / "samples_cfg*.npz"), str(setup / "ref.npz"), run_id=run.info.run_id,
                       classifier=str(setup / "toynet.pt"))
    m = results[str(samples_path(out, 1.0))]
    assert set(m) == {
        "fid_toynet",
        "sfid_toynet",
        "is_toynet",
        "precision_toynet",
        "recall_toynet",
        "class_accuracy_toynet",
    }
    assert m["fid_toynet"] > 0 and 1.0 <= m["is_toynet"] <= 10.0 and 0 <= m["class_accuracy_toynet"] <= 1
    client = mlflow.tracking.MlflowClient()
    parent = client.get_run(run.info.run_id)
    assert {"fid_toynet_cfg1", "fid_toynet_cfg2", "is_toynet_cfg2"} <= set(parent.data.metrics)
    assert client.get_metric_history(run.info.run_id, "fid_toynet_cfg2")[0].step == 7
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 2 and {c.data.params["sampling.cfg_scale"] for c in children} == {"1.0", "2.0"}
    from npp.eval.compare import compare

    # the FID's record of everything it depends on, beside the cached metrics
    prov = json.loads(samples_path(out, 2.0).with_suffix(".metrics.json").read_text())["provenance"]
    made = prov["samples"]
    for k in ("ckpt_sha256", "ckpt_steps", "ema", "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p",
              "labels", "seed", "count", "image_size", "precision", "batch", "ranks", "device", "vq_sha256", "npp",
              "determinism"):
        assert k in made, k
    assert made["ranks"] == 1 and made["device"] == "cpu" and made["npp"].startswith("0.1.0 (git ")
    assert len(prov["reference_sha256"]) == 64 and prov["feature_net"] == "toynet" and prov["eval_npp"]
    # what each FID depends on, beside it: the samples' settings, the reference's content, the feature network
    protocol = json.loads(parent.data.tags["npp.protocol.fid_toynet_cfg2"])
    assert protocol["cfg_scale"] == 2.0 and protocol["per_class"] == _cfg(setup, out).per_class
    assert protocol["feature_net"] == "toynet" and len(protocol["reference_sha256"]) == 64
    assert json.loads(parent.data.tags["npp.protocol.fid_toynet_cfg1"])["cfg_scale"] == 1.0

    runs = compare("npp", str(tmp_path / "cmp"))["runs"]
    ends = {k: v[0] for k, v in runs[0]["curves"].items()}
    assert {"fid_toynet_cfg1", "fid_toynet_cfg2"} <= set(ends) and ends["fid_toynet_cfg2"]["pflops"] == 1e-3
    assert ends["fid_toynet_cfg2"]["step"] == runs[0]["total_steps"] == 7  # the run's annealed end
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_bad_inputs_name_the_file_and_the_fix(setup, tmp_path):
    classifier = str(setup / "toynet.pt")
    no_arr = tmp_path / "x.npz"
    np.savez(no_arr, images=np.zeros((20, 32, 32, 3), np.uint8))
    with pytest.raises(EvalInputError, match="x.npz has no arr_0"):
        evaluate(str(no_arr), str(setup / "ref.npz"), classifier=classifier, log=False)
    small = tmp_path / "small.npz"
    np.savez(small, arr_0=np.zeros((20, 16, 16, 3), np.uint8))
    with pytest.raises(EvalInputError, match="16px but reference .*32px"):
        evaluate(str(small), str(setup / "ref.npz"), classifier=classifier, log=False)
    few = tmp_path / "few.npz"
    np.savez(few, arr_0=np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(EvalInputError, match="3 samples, too few for precision/recall"):
        evaluate(str(few), str(setup / "ref.npz"), classifier=classifier, log=False)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(EvalInputError, match="corrupt.npz is not a readable"):
        evaluate(str(corrupt), str(setup / "ref.npz"), classifier=classifier, log=False)
    adm = tmp_path / "adm.npz"
    np.savez(adm, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(EvalInputError, match="ADM .*cannot be used with toynet"):
        evaluate(str(few), str(adm), classifier=classifier, log=False)
    with pytest.raises(EvalInputError, match="does not exist"):
        evaluate(str(tmp_path / "missing.npz"), str(setup / "ref.npz"), classifier=classifier, log=False)


def test_reference_streams_batches_and_equals_the_one_array_version(setup, tmp_path):
    from npp.eval.reference import iter_real_images

    net = load_feature_net(classifier=str(setup / "toynet.pt"))
    batches, _ = iter_real_images(str(setup / "images"), None, 32, limit=0, batch=16)
    sizes = []

    def watched():
        for b in batches:
            sizes.append(len(b))
            yield b

    streamed = make_reference(net, watched(), str(tmp_path / "streamed.npz"))
    images, _ = real_images(str(setup / "images"), None, 32)
    whole = make_reference(net, images, str(tmp_path / "whole.npz"))
    assert max(sizes) == 16 and sum(sizes) == len(images) == 60  # never more than one batch in memory
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(streamed[key], whole[key], rtol=1e-5, atol=1e-6)
    limited, _ = iter_real_images(str(setup / "images"), None, 32, limit=25, batch=16)
    assert sum(len(b) for b in limited) == 25


def test_make_eval_ref_never_writes_over_adms_reference():
    import subprocess

    out = subprocess.run(["make", "-n", "eval-ref", "SHARDS=shards/in256"], capture_output=True, text=True,
                         cwd=os.path.join(os.path.dirname(__file__), "..", "..")).stdout
    line = next(line for line in out.splitlines() if "npp eval ref" in line)
    assert "--out ckpts/ref_in256.npz" in line and "--limit" not in line  # npp's own default: 50,000 as ADM's
    assert "VIRTUAL_imagenet256_labeled" not in line
    from npp.eval.config import RefConfig

    assert RefConfig.limit == 50_000
