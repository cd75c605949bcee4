"""`npp reproduce` end to end on CPU: stand-ins for a released GPT and LlamaGen's VQ, in the released formats, are
served by a local mirror (NPP_ASSETS_URL) under the real asset names; a test table states the "published" FID."""

import json

import mlflow
import numpy as np
import pytest
import torch

from npp.app.cli import main
from npp.errors import UsageError
from npp.eval.config import FitClassifierConfig
from npp.eval.features import load_feature_net
from npp.eval.fit_classifier import fit_classifier
from npp.eval.published import RELEASES, load_table, tolerance
from npp.eval.reference import make_reference, real_images
from npp.pipeline.toy import write_toy_dataset
from npp.runtime.files import file_sha256
from tests.helpers import make_gpt, save_small_vq
from tests.pipeline.test_assets import Files, server  # noqa: F401 - the local mirror fixture


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A GPT saved as the releases are ({"model": weights}, no config: npp reads it as a 16x16 grid), a VQ saved as
    LlamaGen's, and a 32-px toy reference and classifier as the feature network."""
    root = tmp_path_factory.mktemp("releases")
    gpt = make_gpt(grid=(16, 16), vocab=64, num_classes=10)
    torch.save({"model": gpt.state_dict()}, root / "npp_c2i_B_256.pt")
    # widths LlamaGen's 32 GroupNorm groups divide; one 2x downsampling: the 16x16 codes are 32-px images
    vq = save_small_vq(root / "vq.pt", ch=32, norm_groups=32, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2])
    torch.save({"model": vq.state_dict()}, root / "vq_ds16_c2i.pt")  # LlamaGen's format: weights only
    write_toy_dataset(str(root / "images"), per_class=4, size=32)
    fit_classifier(FitClassifierConfig(str(root / "images"), str(root / "toynet.pt"), image_size=32, epochs=1,
                                       batch=16))
    images, _ = real_images(str(root / "images"), None, 32)
    make_reference(load_feature_net(classifier=str(root / "toynet.pt")), images, str(root / "ref.npz"))
    return root


def _table(path, fid):
    path.write_text(json.dumps({"test-GPT-Nano": {
        "model": "GPT-Nano", "schedule": "npp", "asset": "npp_c2i_B_256.pt", "cfg_scale": 2.0, "fid": fid,
        "source": "a test's stand-in", "settings": {"precision": "fp32"}}}))
    return str(path)


def test_a_release_is_fetched_sampled_evaluated_and_a_mismatch_flagged(stand_ins, server, tmp_path, monkeypatch,  # noqa: F811
                                                                       capsys):
    Files.bodies = {name: (stand_ins / name).read_bytes() for name in ("npp_c2i_B_256.pt", "vq_ds16_c2i.pt")}
    monkeypatch.setenv("NPP_ASSETS_URL", server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    args = ["reproduce", "--model", "GPT-Nano", "--schedule", "npp", "--assets", str(tmp_path / "ckpts"),
            "--out", str(tmp_path / "repro"), "--num-samples", "20", "--batch", "10",
            "--ref", str(stand_ins / "ref.npz"), "--classifier", str(stand_ins / "toynet.pt")]
    main(args + ["--table", _table(tmp_path / "far.json", 1000.0)])
    out = capsys.readouterr().out
    flag = [line for line in out.splitlines() if line.startswith("FLAGGED")]
    assert len(flag) == 1, out
    assert "below the published 1000.00" in flag[0] and "num_samples 50000 -> 20" in flag[0], flag
    assert "feature_net" in flag[0] and "reference" in flag[0], flag  # the toy network is not the published one

    folder = tmp_path / "repro" / "test-GPT-Nano"
    record = json.loads((folder / "reproduce.json").read_text())
    ckpt = tmp_path / "ckpts" / "npp_c2i_B_256.pt"
    assert record["flagged"] and record["settings"]["labels"] == "random" and record["settings"]["cfg_scale"] == 2.0
    made = record["provenance"]["samples"]
    assert made["ckpt_sha256"] == file_sha256(str(ckpt)) == file_sha256(str(stand_ins / "npp_c2i_B_256.pt"))
    assert made["vq_sha256"] == file_sha256(str(stand_ins / "vq_ds16_c2i.pt")) and made["count"] == 20
    assert made["labels"] == "random" and made["precision"] == "fp32" and made["ranks"] == 1 and made["npp"]
    assert record["provenance"]["reference_sha256"] == file_sha256(str(stand_ins / "ref.npz"))
    # the fetched files are held to the checksums recorded at their first download
    sums = (tmp_path / "ckpts" / "SHA256SUMS").read_text()
    assert file_sha256(str(ckpt)) in sums and "vq_ds16_c2i.pt" in sums
    samples = folder / "samples" / "samples_cfg2.npz"
    z = np.load(samples)
    assert z["arr_0"].shape == (20, 32, 32, 3) and len(set(z["labels"].tolist())) > 1  # random labels

    client = mlflow.tracking.MlflowClient()
    run, = client.search_runs([client.get_experiment_by_name("reproduce").experiment_id],
                              filter_string="tags.`npp.reproduce` = 'test-GPT-Nano'")
    fid = run.data.metrics["Results/fid_toynet"]  # the results open the charts, the published FID beside
    assert run.data.metrics["Results/fid_toynet_published"] == 1000.0
    assert run.data.tags["npp.reproduce.flagged"] == "true"
    assert run.data.params["overridden.num_samples"] == "50000 -> 20"
    assert record["metrics"]["fid_toynet"] == pytest.approx(fid)

    # the same release with its "published" FID equal to the measured one: within tolerance, nothing made again
    stamp = (samples.stat().st_mtime_ns, samples.with_suffix(".metrics.json").stat().st_mtime_ns)
    main(args + ["--table", _table(tmp_path / "near.json", round(fid, 2))])
    out = capsys.readouterr().out
    assert "within tolerance" in out and "FLAGGED" not in out and "made already" in out, out
    assert stamp == (samples.stat().st_mtime_ns, samples.with_suffix(".metrics.json").stat().st_mtime_ns)


def test_the_table_and_its_tolerance(tmp_path, capsys):
    """Every release names an asset npp can fetch; the tolerance is the toy spread scaled to the sample count,
    never below its floor; a user's table entry without every field is refused with the fields it needs."""
    from npp.pipeline.assets import ASSETS

    assert all(r.asset in ASSETS and ASSETS[r.asset].kind == "gpt" and not ASSETS[r.asset].default
               for r in RELEASES.values())
    assert tolerance(5.46, 50_000) == 0.1 and tolerance(56.0, 1000) == pytest.approx(3.15)
    assert tolerance(56.0, 4000) == pytest.approx(3.15 / 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"model": "GPT-B"}}))
    with pytest.raises(UsageError, match="needs model, schedule, asset, cfg_scale, fid and source"):
        load_table(str(bad))
    main(["reproduce", "list"])
    listed = capsys.readouterr().out
    assert all(r.asset in listed for r in RELEASES.values())
    with pytest.raises(SystemExit):  # an unknown release: one line naming the releases
        main(["reproduce", "--model", "GPT-XXXL", "--schedule", "ntp", "--dry-run"])
    assert "MODEL=GPT-B SCHEDULE=ntp" in capsys.readouterr().err
