"""NPP's augmentation recipe (ten crops at two ranges = 20 views) and training on several shard sets."""

import numpy as np
import pytest

from npp.pipeline.global_stream import GlobalStream
from npp.pipeline.images import decode_image, make_views
from npp.pipeline.shards import ShardSetError, iter_tar_samples, open_shard_sets, read_meta
from npp.pipeline.sources import open_source, read_bytes
from npp.pipeline.stream import shard_paths
from npp.tokenize.run import TokenizeConfig, tokenize
from tests.helpers import save_small_vq as save_vq


def _run(data, vq, out, **kw):
    return tokenize(TokenizeConfig(data=str(data), vq=str(vq), out=str(out), image_size=32, samples_per_shard=8,
                                   batch=40, workers=0, **kw).plan())


def test_ten_crop_at_two_ranges_stores_twenty_views(toy_tree):
    img = decode_image(read_bytes(open_source(str(toy_tree)).items[0]))
    twenty = make_views(img, 32, ten_crop=True, crop_range="1.1,1.05")
    assert twenty.shape == (20, 32, 32, 3)
    assert np.array_equal(twenty[:10], make_views(img, 32, ten_crop=True, crop_range=1.1))
    assert np.array_equal(twenty[10:], make_views(img, 32, ten_crop=True, crop_range=1.05))


@pytest.fixture(scope="module")
def two_sets(toy_tree, vq_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    _run(toy_tree, vq_path, root / "flip")  # 2 views
    _run(toy_tree, vq_path, root / "tencrop", ten_crop=True, crop_range="1.1,1.05")
    return root


def test_npp_recipe_shards_hold_uint16_twenty_views(two_sets):
    meta = read_meta(two_sets / "tencrop")
    assert meta["views"]["views"] == 20 and meta["views"]["crop_ranges"] == [1.1, 1.05]
    s = next(iter_tar_samples(sorted((two_sets / "tencrop").glob("*.tar"))[0]))
    assert s.codes.dtype == np.uint16 and s.codes.shape == (20, 8, 8)


def test_several_shard_sets_train_as_one_epoch(two_sets, monkeypatch):
    meta, manifest = open_shard_sets(f"{two_sets}/flip,{two_sets}/tencrop")
    one, _ = open_shard_sets(str(two_sets / "flip"))
    assert meta["samples"] == 2 * one["samples"] == 68 and len(meta["sets"]) == 2
    globbed, _ = open_shard_sets(f"{two_sets}/*")
    assert globbed["samples"] == 68 and globbed["sets"] == sorted(globbed["sets"])
    paths, counts = shard_paths("", manifest)
    stream = GlobalStream(paths, counts, batch_size=68, shuffle_buffer=10)
    batch = next(stream.iter_worker(0, 1))
    assert batch["codes"].shape == (68, 64)  # one view of each sample, 2-view and 20-view alike
    # the trainer sizes its epoch from both sets
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan
    from npp.train.trainer import Trainer

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    t = Trainer(make_plan(TrainConfig(shards=f"{two_sets}/flip,{two_sets}/tencrop", out=str(two_sets / "run"),
                            model="GPT-Nano", global_batch=16, epochs=2, ds_config="ds_configs/zero2.json")))
    assert t.plan.steps_per_epoch == 68 // 16 and t.total_steps == 2 * (68 // 16)


def test_shard_sets_of_different_tokenizers_are_refused(two_sets, toy_tree, tmp_path):
    save_vq(tmp_path / "other.pt", seed=1)
    _run(toy_tree, tmp_path / "other.pt", tmp_path / "other")
    with pytest.raises(ShardSetError, match="differ in tokenizer"):
        open_shard_sets(f"{two_sets}/flip,{tmp_path}/other")
    with pytest.raises(ShardSetError, match="matches no shard set"):
        open_shard_sets(f"{tmp_path}/nothing-*")


@pytest.mark.parametrize("views,expected", [(2, 3072), (20, 12288)])
def test_bytes_per_sample_in_the_tars_as_readme_states(views, expected):
    """README's ImageNet disk figures: 3 KB (2 views) and 12 KB (20 views) per 16x16-code sample."""
    from npp.pipeline.shards import Sample, encode_tar
    from npp.pipeline.sources import unique_key

    def tar(n):
        return len(encode_tar([Sample(unique_key(f"n01440764/n01440764_{10026 + i}.JPEG"),
                                      np.zeros((views, 16, 16), np.uint16), 0) for i in range(n)]))

    per_sample = (tar(40) - tar(20)) // 20
    assert per_sample == expected
    assert per_sample * 1_281_167 / 1e9 == pytest.approx(3.9 if views == 2 else 15.7, abs=0.05)
