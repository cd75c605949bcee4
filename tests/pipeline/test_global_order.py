"""Data order 2: the same samples per optimizer step on any layout, and resumes across layouts."""

import numpy as np
import pytest

from npp.pipeline.global_order import epoch_order, shuffle_buffer_order
from npp.pipeline.global_stream import GlobalStream
from npp.pipeline.stream import CorruptShardError, make_loader
from tests.pipeline.test_stream import make_shards

EPOCH = 60  # make_shards' default: 6 shards of 10 samples


def buffer_by_loop(n, size, rng):
    """The shuffle buffer as webdataset runs it, one item at a time (the reference for the vectorized one)."""
    size = max(1, min(size, n))
    slots, out = list(range(size)), []
    for t, j in enumerate(rng.integers(size, size=max(0, n - size))):
        out.append(slots[j])
        slots[j] = size + t
    return out + [slots[i] for i in rng.permutation(size)]


@pytest.mark.parametrize("n,size", [(100, 7), (10, 10), (10, 30), (1, 5), (500, 1), (3000, 250)])
def test_the_vectorized_shuffle_buffer_is_the_loop(n, size):
    got = shuffle_buffer_order(n, size, np.random.default_rng(3))
    assert got.tolist() == buffer_by_loop(n, size, np.random.default_rng(3))


def test_an_epoch_is_every_sample_once_and_depends_on_seed_and_epoch_only():
    counts = [10, 7, 12, 10]
    a, views = epoch_order(counts, 5, 0, 8, 2)
    assert sorted(a.tolist()) == list(range(39)) and ((views >= 0) & (views < 1)).all()
    assert np.array_equal(a, epoch_order(counts, 5, 0, 8, 2)[0])
    assert not np.array_equal(a, epoch_order(counts, 5, 1, 8, 2)[0])
    assert not np.array_equal(a, epoch_order(counts, 6, 0, 8, 2)[0])


def sample_view(stream, batch):
    """(sample id, view) of each row: the id sits in cell 0 of every view, the view is found by its codes."""
    rows = []
    for row in batch["codes"]:
        uid = int(row[0])
        views = stream.views_of[uid]
        rows.append((uid, next(v for v in range(len(views)) if np.array_equal(views[v], row))))
    return rows


def run_order(paths, counts, world, micro, workers, micro_batches, start_sample=0, loader=False):
    """The (id, view) sequence a layout reads, put in run-position order (rank r's micro-batch m sits at
    position (m·world + r)·micro), from in-process workers or a real DataLoader's processes."""
    by_position = {}
    for rank in range(world):
        stream = GlobalStream(paths, counts, micro, rank=rank, world=world, seed=4, shuffle_buffer=9, mix_shards=2,
                              num_workers=workers, start_sample=start_sample)
        stream.views_of = VIEWS
        if loader:
            it = iter(make_loader(stream, workers))
            batches = [next(it) for _ in range(micro_batches)]
        else:
            its = [stream.iter_worker(w, max(1, workers)) for w in range(max(1, workers))]
            batches = [next(its[m % len(its)]) for m in range(micro_batches)]
        for m, batch in enumerate(batches):
            by_position[stream.batch_start(m)] = sample_view(stream, batch)
    return [x for p in sorted(by_position) for x in by_position[p]]


VIEWS: dict = {}


@pytest.fixture
def shards(tmp_path):
    paths, counts = make_shards(tmp_path, views=3)
    from npp.pipeline.tar_reader import parse_shard

    VIEWS.clear()
    for path in paths:
        for _key, codes, _label in parse_shard(open(path, "rb").read()):
            VIEWS[int(codes[0, 0, 0])] = [codes[v].reshape(-1) for v in range(len(codes))]
    return paths, counts


def test_every_layout_reads_the_same_global_batches(shards):
    """Global batch 12 as 1 rank x 12, 2 ranks x 6 (2 workers, in real loader processes), 4 ranks x 3 (3 workers),
    and 2 ranks x 3 with 2 accumulation steps: 9 global batches, over a data-epoch boundary (every 60)."""
    paths, counts = shards
    one = run_order(paths, counts, 1, 12, 0, 9)
    assert len(one) == 108 and sorted(u for u, _ in one[:EPOCH]) == list(range(EPOCH))
    assert {v for _, v in one} == {0, 1, 2}  # every view is drawn
    assert run_order(paths, counts, 2, 6, 2, 9, loader=True) == one
    assert run_order(paths, counts, 4, 3, 3, 9) == one
    assert run_order(paths, counts, 2, 3, 2, 18) == one


@pytest.mark.parametrize("world,micro,workers", [(4, 3, 2), (1, 6, 0), (3, 4, 1)])
def test_a_run_stopped_on_2_ranks_continues_on_another_layout(shards, world, micro, workers):
    """Interrupted on 2 ranks x 6 after 7 micro-batches (84 samples, into the second data epoch), resumed at that
    run position on 4, 1 or 3 ranks: the sequence continues, no sample skipped or repeated in the epoch."""
    paths, counts = shards
    whole = run_order(paths, counts, 2, 6, 2, 15)  # 180 samples: 3 data epochs
    before = run_order(paths, counts, 2, 6, 2, 7)
    after = run_order(paths, counts, world, micro, workers, (180 - 84) // (world * micro), start_sample=84)
    assert before + after == whole
    second_epoch = [u for u, _ in (before + after)[EPOCH : 2 * EPOCH]]
    assert sorted(second_epoch) == list(range(EPOCH))


def test_an_unreadable_shard_is_replaced_inside_its_batch_and_reported_once(shards):
    paths, counts = shards
    positions = range(0, 2 * EPOCH, 12)  # two data epochs
    sound = [GlobalStream(paths, counts, 12, seed=4, shuffle_buffer=9, mix_shards=2).batch_at(p) for p in positions]
    with open(paths[1], "r+b") as fh:
        fh.seek(1024 + 100)
        fh.write(b"\xff\xff")
    stream = GlobalStream(paths, counts, 12, seed=4, shuffle_buffer=9, mix_shards=2)
    batches = [stream.batch_at(p) for p in positions]
    reports = [s for b in batches for s in b["skipped"]]
    assert sum(b["corrupt"] for b in batches) == 2 == len(reports)  # once in each data epoch
    both = GlobalStream(paths, counts, 2 * EPOCH, seed=4, shuffle_buffer=9,
                        mix_shards=2).batch_at(0)  # one batch: two data epochs
    assert both["corrupt"] == 2 and len(both["skipped"]) == 1  # counted per epoch, named once
    assert all(r.startswith(f"{paths[1]} (bad tar header checksum") for r in reports)
    for clean, got in zip(sound, batches, strict=True):
        was, now = [int(r[0]) for r in clean["codes"]], [int(r[0]) for r in got["codes"]]
        assert len(now) == 12 and not [i for i in now if 10 <= i < 20]  # shard 1 holds samples 10-19
        # every other sample keeps its place; shard 1's places are taken by samples of the same batch
        assert all(n == w for w, n in zip(was, now, strict=True) if not 10 <= w < 20)
        assert set(now) == {w for w in was if not 10 <= w < 20}


def test_a_batch_of_unreadable_samples_only_names_the_shards(shards):
    paths, counts = shards
    for path in paths:
        open(path, "r+b").truncate(1500)
    stream = GlobalStream(paths, counts, 4, seed=4)
    with pytest.raises(CorruptShardError, match=r"train-000000.tar \(.*truncated.*re-tokenize these shards"):
        stream.batch_at(0)


def test_a_shard_shorter_than_its_manifest_says_is_unreadable(shards):
    paths, counts = shards
    stream = GlobalStream(paths, [10, 12, 10, 10, 10, 10], 62, seed=4)  # one data epoch
    batch = stream.batch_at(0)
    assert batch["skipped"] == [f"{paths[1]} (holds 10 complete samples, its manifest says 12: re-tokenize it)"]
    assert batch["corrupt"] == 1


def test_a_worker_keeps_few_shards_mapped_and_a_machine_error_is_not_a_corrupt_shard(shards, monkeypatch):
    """Every index is kept, at most MAX_OPEN maps (each holds a file descriptor; ImageNet has more shards than a
    process may open): the batches are the same. "Too many open files" or an I/O error stops the worker instead of
    marking a sound shard unreadable for good; a missing file is an unreadable shard, reported."""
    import errno

    from npp.pipeline import global_stream

    paths, counts = shards
    whole = GlobalStream(paths, counts, 12, seed=4, mix_shards=2)
    expected = [whole.batch_at(p)["codes"] for p in range(0, 2 * EPOCH, 12)]
    monkeypatch.setattr(global_stream, "MAX_OPEN", 2)
    few = GlobalStream(paths, counts, 12, seed=4, mix_shards=2)
    for p, codes in zip(range(0, 2 * EPOCH, 12), expected, strict=True):
        assert np.array_equal(few.batch_at(p)["codes"], codes)
        assert len(few._maps) <= 2
    assert len(few._index) == len(paths)

    def no_descriptor(path):
        raise OSError(errno.EMFILE, "Too many open files", path)

    monkeypatch.setattr(global_stream, "map_shard", no_descriptor)
    with pytest.raises(OSError, match="Too many open files"):
        GlobalStream(paths, counts, 12, seed=4).batch_at(0)
    monkeypatch.undo()
    import os

    os.remove(paths[2])
    batch = GlobalStream(paths, counts, EPOCH, seed=4).batch_at(0)
    assert batch["corrupt"] == 1 and batch["skipped"] == [f"{paths[2]} (No such file or directory)"]


def test_the_trainer_resumes_at_the_run_position_on_another_layout(shards):
    """npp.train.data_feed: 7 micro-batches of 2 ranks x 6 were taken; 4 ranks x 3 continue at sample 84, and a
    start on the old layout too (the sample count, not the micro-batch count, is what carries over)."""
    from npp.train.data_feed import DataFeed
    from npp.train.state import TrainState

    paths, counts = shards
    manifest = [{"path": p, "samples": c} for p, c in zip(paths, counts, strict=True)]
    state = TrainState(micro_batches=7, data_layout={"world_size": 2, "workers": 2, "micro_batch": 6})
    lines = []
    for world, micro, expect_log in ((4, 3, True), (2, 6, False)):
        feed = DataFeed("", manifest, 4, 9, 2, micro, 1, world, 2)
        base = feed.position(state, True, lines.append)
        assert base == {"epoch": 1, "micro_batches": 7, "samples": 84}
        assert bool(lines) == expect_log and (not lines or "continuing at sample 84 (data epoch 1)" in lines[0])
        lines.clear()
    # a second change of layout: 3 more micro-batches of 2 x 6 since that start (36 samples), then 4 x 3
    later = TrainState(micro_batches=10, data_base=dict(base), data_layout={"world_size": 2, "workers": 2,
                                                                         "micro_batch": 6})
    assert DataFeed("", manifest, 4, 9, 2, 3, 0, 4, 1).position(later, True, lines.append) == {
        "epoch": 2, "micro_batches": 10, "samples": 120}
    state.data_base = base
    first = next(iter(feed.loader(state)))  # rank 1 of 2 x 6: positions 90-95 of the run
    stream = GlobalStream(paths, counts, 6, seed=4, shuffle_buffer=9, mix_shards=2)
    assert np.array_equal(first["codes"], stream.batch_at(90)["codes"])


def test_a_run_keeps_the_data_order_and_mlflow_names_it_began_with(tmp_path):
    """Runs begun before data order 2 (config.json without `data_order`) resume with order 1; a branch takes its
    parent's order; a new run takes order 2. The MLflow names (npp.runtime.metric_names) alike: a branch's run
    holds its parent's points up to the branch step, so it keeps the parent's names."""
    import json

    from npp.train.plan import data_order_of, mlflow_names_of

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"train": {}}))
    assert mlflow_names_of({"train": {}}, None) == 1 and mlflow_names_of(None, {"parent": str(old)}) == 1
    assert mlflow_names_of({"mlflow_names": 2}, None) == mlflow_names_of(None, None) == 2

    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"train": {}}))
    assert data_order_of({"train": {}}, None) == 1
    assert data_order_of({"data_order": 2}, None) == 2
    assert data_order_of(None, {"parent": str(parent)}) == 1
    (parent / "config.json").write_text(json.dumps({"data_order": 2}))
    assert data_order_of(None, {"parent": str(parent)}) == 2
    assert data_order_of(None, None) == 2
