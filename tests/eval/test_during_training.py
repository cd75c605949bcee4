"""FID during training: logged at the eval points beside train_flops, without changing what training does."""

import pytest

from tests.train.conftest import launch, read_metrics


@pytest.fixture(scope="module")
def eval_assets(shard_set, tmp_path_factory):
    from npp.eval.features import load_feature_net
    from npp.eval.fit_classifier import fit_classifier
    from npp.eval.reference import make_reference, real_images

    root = tmp_path_factory.mktemp("eval_assets")
    images = shard_set.parent / "images"
    fit_classifier(str(images), str(root / "toynet.pt"), epochs=2, batch=16)
    net = load_feature_net(classifier=str(root / "toynet.pt"))
    make_reference(net, real_images(str(images), None, 32)[0], str(root / "ref.npz"))
    return {"vq": str(shard_set.parent / "vq.pt"), "eval_ref": str(root / "ref.npz"),
            "classifier": str(root / "toynet.pt")}


@pytest.mark.slow
def test_eval_points_are_logged_against_flops_and_leave_training_unchanged(shard_set, tmp_path, eval_assets):
    import mlflow

    run_args = dict(total_steps=12, log_every=4, ckpt_every=1000, schedule="2:0.5,1:0.5")
    plain = tmp_path / "plain"
    launch(shard_set, plain, tmp_path, **run_args)
    evald = tmp_path / "evald"
    log = launch(shard_set, evald, tmp_path, eval_every=5, eval_per_class=2, eval_batch=8, **eval_assets, **run_args)
    assert [r["loss"] for r in read_metrics(evald)] == [r["loss"] for r in read_metrics(plain)]  # bit-equal
    assert log.count("eval at step") == 3  # steps 5, 10 and the last, 12
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    run_id = (evald / "mlflow_run_id").read_text()
    fid = client.get_metric_history(run_id, "fid_toynet")
    assert [m.step for m in fid] == [5, 10, 12]
    flops = {m.step: m.value for m in client.get_metric_history(run_id, "train_flops")}
    assert flops[5] < flops[10] < flops[12]
    for key in ("is_toynet", "class_accuracy_toynet", "eval_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [5, 10, 12], key
