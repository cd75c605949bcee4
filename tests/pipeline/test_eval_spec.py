"""npp.pipeline.eval_spec: what an evaluation is and what makes two FIDs comparable (the contract between the
trainer's evaluation points, `npp eval watch`, `npp eval` and `npp compare`)."""

import pytest

from npp.errors import UsageError
from npp.pipeline.eval_spec import EvalSpec, fid_protocol, protocol_differences, protocol_tags


def test_a_protocol_is_normalised_and_tagged_beside_each_fid_only():
    a = fid_protocol(10, 2, 1, 0, "abc", "inception")
    b = fid_protocol("10", 2.0, 1.0, "0", "abc", "inception", top_p=1, cfg_interval=-1, labels="balanced")
    assert a == b and isinstance(b["cfg_scale"], float) and isinstance(b["per_class"], int)  # typed as numbers
    tags = protocol_tags(a, {"fid_toynet": 3.0, "sfid_toynet": 4.0, "is_toynet": 9.0, "train_flops": 1.0})
    assert sorted(tags) == ["npp.protocol.fid_toynet", "npp.protocol.sfid_toynet"]
    assert protocol_tags(None, {"fid": 1.0}) == {}


def test_what_differs_between_two_protocols_is_named():
    a = fid_protocol(10, 2.0, 1.0, 0, "abc", "inception")
    assert protocol_differences(a, dict(a)) == []
    assert protocol_differences(a, {**a, "per_class": 50, "cfg_scale": 1.5}) == [
        "per_class 10 vs 50", "cfg_scale 2.0 vs 1.5"]
    assert protocol_differences(a, None) == ["protocol not recorded for one of them"]
    assert protocol_differences(None, None) == []


def test_a_spec_names_its_flags_as_the_command_spells_them(tmp_path):
    """npp train spells them --eval-ref, --eval-per-class; npp eval watch --ref, --per-class; the files' own
    flags (--vq, --inception, --classifier) are the same in both."""
    with pytest.raises(UsageError, match=r"needs --vq .* --eval-ref REF.npz .* \(--inception PATH or --classifier"):
        EvalSpec().validate("eval-")
    for name in ("vq", "ref", "classifier"):
        (tmp_path / name).write_text("x")
    spec = EvalSpec(vq=str(tmp_path / "vq"), ref=str(tmp_path / "ref"), classifier=str(tmp_path / "classifier"))
    spec.validate()
    with pytest.raises(UsageError, match="--eval-per-class and --eval-batch must be at least 1"):
        EvalSpec(**{**spec.__dict__, "per_class": 0}).validate("eval-")
    with pytest.raises(UsageError, match=r"--ref .*missing does not exist: `make assets`"):
        EvalSpec(**{**spec.__dict__, "ref": str(tmp_path / "missing")}).validate()


def test_the_evaluation_during_training_is_declared_once_by_the_eval_spec():
    """`npp train --eval-*` are EvalSpec's flags (npp eval watch's), not a second declaration: each has the spec's
    type and default (its meaning, in train's words where they differ), and the spec a run evaluates with is made
    of them."""
    import dataclasses
    import typing

    from npp.pipeline.eval_spec import RUN_FILES
    from npp.train.config import TrainConfig

    spec = {f.name: f for f in dataclasses.fields(EvalSpec)}
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    spec_types, train_types = typing.get_type_hints(EvalSpec), typing.get_type_hints(TrainConfig)
    for name, f in spec.items():
        if name == "seed":  # the run's own --seed
            continue
        mine = name if name in RUN_FILES else "eval_" + name
        assert (train[mine].default, train_types[mine]) == (f.default, spec_types[name]), mine
        assert train[mine].metadata["help"], mine
    cfg = TrainConfig(shards="s", out="o", vq="v.pt", eval_ref="r.npz", eval_per_class=3, eval_cfg_scale=1.5, seed=7)
    assert cfg.eval_spec() == EvalSpec(vq="v.pt", ref="r.npz", per_class=3, cfg_scale=1.5, seed=7)
    assert TrainConfig(shards="s", out="o", eval_cfg=4).eval_spec().cfg_scale == 4.0  # the old spelling wins
