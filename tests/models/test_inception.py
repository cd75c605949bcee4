import pytest
import torch

from npp.models.checkpoint import CheckpointMismatchError
from npp.models.inception import FIDInception, load_inception, tf_legacy_resize_matrix


def test_standard_names_and_shapes_load_and_run(tmp_path):
    torch.manual_seed(0)
    net = FIDInception()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    for name, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }.items():
        assert tuple(state[name].shape) == shape, name
    assert len(state) == 472  # 94 conv+bn blocks x (weight + 4 BatchNorm tensors) + fc weight and bias
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)  # the port stores a bare state dict
    loaded = load_inception(str(path))
    images = torch.randint(0, 256, (2, 64, 48, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = loaded(images)
        ref = net.eval()(images)
    assert (
        out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 7 * 17 * 17)
    )
    torch.testing.assert_close(out["pool"], ref["pool"])
    torch.testing.assert_close(out["logits"], out["pool"] @ loaded.fc.weight.t())  # no bias, as ADM's softmax


def test_missing_and_wrong_weights_say_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.delenv("NPP_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_inception(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointMismatchError, match="(?s)missing .*pt_inception"):
        load_inception(str(bad))


def test_tf_legacy_bilinear_resize():
    m = tf_legacy_resize_matrix(2, 4)  # src = dst * 0.5, no half-pixel centres
    assert m.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]]
    assert torch.allclose(tf_legacy_resize_matrix(7, 7), torch.eye(7))
    assert torch.allclose(tf_legacy_resize_matrix(256, 299).sum(1), torch.ones(299))
