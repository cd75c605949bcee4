import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from npp.pipeline.shards import Sample, encode_tar
from npp.pipeline.stream import CodeStream, CorruptShardError, assign_shards, batch_to_device, make_loader, parse_shard


def make_shards(tmp_path, n_shards=6, per_shard=10, views=2, grid=4):
    paths, counts = [], []
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            uid = s * per_shard + i
            codes = rng.integers(0, 100, (views, grid, grid)).astype(np.uint16)
            codes[:, 0, 0] = uid  # the sample's id, in every view
            samples.append(Sample(f"img{uid:05d}", codes, uid % 7))
        path = tmp_path / f"train-{s:06d}.tar"
        path.write_bytes(encode_tar(samples))
        paths.append(str(path))
        counts.append(per_shard)
    return paths, counts


def ids(batch):
    return batch["codes"][:, 0].tolist()


def take(stream, n, workers=0):
    it = iter(make_loader(stream, workers))
    out = []
    for _ in range(n):
        batch = next(it)
        codes, labels = batch_to_device(batch, torch.device("cpu"))
        out.append({"codes": codes, "labels": labels, "corrupt": batch["corrupt"]})
    return out


def test_parse_shard_matches_tarfile_reader(tmp_path):
    from npp.pipeline.shards import iter_tar_samples

    paths, _ = make_shards(tmp_path, n_shards=1)
    parsed = parse_shard(open(paths[0], "rb").read())
    ref = list(iter_tar_samples(paths[0]))
    assert [k for k, _, _ in parsed] == [s.key for s in ref]
    assert all(np.array_equal(c, s.codes) and lab == s.label for (_, c, lab), s in zip(parsed, ref, strict=False))


def test_long_keys_use_gnu_long_names(tmp_path):
    key = "n01440764/" + "x" * 150
    data = encode_tar([Sample(key, np.zeros((1, 2, 2), np.uint16), 3)])
    assert parse_shard(data)[0][0] == key


def test_corrupt_and_truncated_shards_raise(tmp_path):
    paths, _ = make_shards(tmp_path, n_shards=1)
    data = open(paths[0], "rb").read()
    bad = bytearray(data)
    bad[1024 + 100] ^= 0xFF
    with pytest.raises(CorruptShardError, match="checksum"):
        parse_shard(bytes(bad))
    with pytest.raises(CorruptShardError, match="truncated"):
        parse_shard(bytes(data[:2000]))


def test_every_sample_once_per_data_epoch(tmp_path):
    paths, counts = make_shards(tmp_path)
    stream = CodeStream(paths, counts, batch_size=4, shuffle_buffer=7, seed=1)
    got = [i for b in take(stream, 15) for i in ids(b)]  # 60 samples = one epoch
    assert sorted(got) == list(range(60))
    assert got != list(range(60))  # shuffled


def test_ranks_and_workers_get_disjoint_shards(tmp_path):
    paths, counts = make_shards(tmp_path, n_shards=8)
    per_rank = []
    for rank in range(2):
        stream = CodeStream(paths, counts, batch_size=5, rank=rank, world=2, num_workers=2, seed=3)
        per_rank.append({i for b in take(stream, 8, workers=2) for i in ids(b)})
    assert per_rank[0].isdisjoint(per_rank[1]) and len(per_rank[0] | per_rank[1]) == 80
    shards = [assign_shards(8, 0, 3, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(shards, [])) == list(range(8))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path, workers):
    paths, counts = make_shards(tmp_path, n_shards=4)
    full = take(CodeStream(paths, counts, batch_size=3, num_workers=workers, shuffle_buffer=5), 50, workers)
    # 50 batches of 3 = 2.5 epochs: the resume skips whole epochs by counting and replays the rest
    for start in (1, 7, 20, 41):
        resumed = take(CodeStream(paths, counts, batch_size=3, num_workers=workers, shuffle_buffer=5,
                                  start_batches=start), 50 - start, workers)
        for a, b in zip(full[start:], resumed, strict=False):
            assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["labels"], b["labels"])


def test_views_are_picked_at_random(tmp_path):
    paths, counts = make_shards(tmp_path, n_shards=1, per_shard=40, views=2)
    # view 1 differs from view 0 outside the id cell; the stream must use both
    batches = take(CodeStream(paths, counts, batch_size=40), 1)
    from npp.pipeline.stream import parse_shard as p

    samples = {int(c[0, 0, 0]): c for _, c, _ in p(open(paths[0], "rb").read())}
    chosen = Counter()
    for row in batches[0]["codes"]:
        c = samples[int(row[0])]
        chosen[next(v for v in range(2) if np.array_equal(c[v].reshape(-1), row.numpy()))] += 1
    assert chosen[0] > 5 and chosen[1] > 5


def test_too_few_shards_for_ranks_and_workers(tmp_path):
    paths, counts = make_shards(tmp_path, n_shards=3)
    with pytest.raises(ValueError, match="3 shards cannot feed 2 ranks x 2 loader workers"):
        CodeStream(paths, counts, batch_size=2, world=2, num_workers=2)


def test_corrupt_shard_is_skipped_and_counted(tmp_path):
    paths, counts = make_shards(tmp_path, n_shards=3)
    with open(paths[1], "r+b") as fh:
        fh.seek(1024 + 100)
        fh.write(b"\xff\xff")
    stream = CodeStream(paths, counts, batch_size=4, shuffle_buffer=1)
    batches = list(itertools.islice(iter(stream), 5))  # the raw batches, with what each reports as skipped
    assert sum(b["corrupt"] for b in batches) == 1
    skipped = [s for b in batches for s in b["skipped"]]
    assert len(skipped) == 1 and skipped[0].startswith(f"{paths[1]} (")  # the path and the reason, once
    taken = take(CodeStream(paths, counts, batch_size=4, shuffle_buffer=1), 5)
    assert {i // 10 for b in taken for i in ids(b)} == {0, 2}


def test_next_untouched_epoch_after_a_layout_change(tmp_path):
    from npp.pipeline.stream import next_untouched_epoch

    paths, counts = make_shards(tmp_path, n_shards=8, per_shard=10)  # 80 samples per data epoch
    # one stream: 25 batches of 4 = 100 samples = epoch 0 whole + a quarter of epoch 1 -> epoch 2 is untouched
    assert next_untouched_epoch(paths, counts, 4, 1, 0, 0, 0, 25) == 2
    assert next_untouched_epoch(paths, counts, 4, 1, 0, 0, 0, 20) == 1  # exactly one epoch: epoch 1 untouched
    assert next_untouched_epoch(paths, counts, 4, 1, 0, 0, 3, 0) == 3  # nothing read since the base epoch
    # 2 ranks x 2 workers: each logical stream owns 2 shards (20 samples) per epoch; after 11 batches of 5 per
    # rank, worker 0 has made 6 (30 samples: into epoch 1) and worker 1 5 (25: into epoch 1) -> epoch 2
    assert next_untouched_epoch(paths, counts, 5, 2, 2, 0, 0, 11) == 2
    # check the arithmetic against the real streams: 110 samples read = all 80 of epoch 0 and 30 of epoch 1
    old = [i for r in range(2) for b in take(CodeStream(paths, counts, batch_size=5, rank=r, world=2,
                                                        num_workers=2), 11, workers=2) for i in ids(b)]
    assert len(old) == 110 and len(set(old)) == 80  # epoch 0 complete, part of epoch 1


CRASH = """
import sys
from npp.pipeline.stream import CodeStream, make_loader
paths, counts = sys.argv[1].split(","), [10] * 4
batches = iter(make_loader(CodeStream(paths, counts, batch_size=4, num_workers=2, shuffle_buffer=8), 2))
next(batches)
print("workers", flush=True)
raise RuntimeError("a rank fails with its DataLoader alive")
"""


def test_a_rank_that_fails_with_live_loader_workers_exits(tmp_path):
    """Workers ignore SIGTERM (see npp.runtime.workers); multiprocessing's exit hook terminates them with SIGTERM and
    joins: without our own hook the failed rank hangs forever."""
    import subprocess
    import sys

    paths, _ = make_shards(tmp_path, n_shards=4)
    proc = subprocess.Popen([sys.executable, "-c", CRASH, ",".join(paths)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("the process hung at exit with its loader workers alive: " + out + err[-2000:]) from None
    assert "workers" in out and "a rank fails with its DataLoader alive" in err
    assert proc.returncode == 1
