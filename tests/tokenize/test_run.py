import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from npp.errors import UsageError
from npp.models.checkpoint import load_vq
from npp.pipeline.images import decode_image, make_views, to_model_input
from npp.pipeline.shards import ShardSetError, iter_tar_samples, load_manifest, read_meta
from npp.pipeline.sources import SourceError, open_source, read_bytes, unique_key
from npp.tokenize.run import TokenizeConfig, finalize, resolve_rank, tokenize
from tests.helpers import save_small_vq as save_vq

N_INPUTS = 30 + 7  # toy images + odd files


def run(toy_tree, vq_path, out, **kw):
    cfg = TokenizeConfig(data=str(toy_tree), vq=str(vq_path), out=str(out), image_size=32,
                         samples_per_shard=8, batch=16, workers=0, **kw)
    return tokenize(cfg.plan())


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def all_samples(out):
    return {s.key: s for p in sorted(out.glob("train-*.tar")) for s in iter_tar_samples(p)}


def test_codes_in_shards_equal_direct_encode_and_counts_add_up(toy_tree, vq_path, tmp_path):
    out = tmp_path / "shards"
    counts = run(toy_tree, vq_path, out)
    meta = read_meta(out)
    assert meta["complete"] and meta["samples"] + meta["failures"] == N_INPUTS
    assert meta["grid"] == [8, 8] and meta["views"]["views"] == 2 and meta["num_classes"] == 10
    assert counts["encoded"] + counts["failed"] == N_INPUTS
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    reasons = {os.path.basename(f["source"]): f["reason"] for f in failures}
    assert set(reasons) == {"zero.png", "notes.txt", "truncated.jpg"}
    assert "empty file" in reasons["zero.png"]
    manifest = load_manifest(out)
    assert sum(m["samples"] for m in manifest) == meta["samples"] == 34
    for m in manifest:
        assert hashlib.sha256((out / m["file"]).read_bytes()).hexdigest() == m["sha256"]

    vq, _ = load_vq(vq_path)
    source = open_source(str(toy_tree))
    samples = all_samples(out)
    assert len(samples) == 34
    for item in source.items[:12] + source.items[-3:]:
        if item.key not in samples:
            continue
        views = make_views(decode_image(read_bytes(item)), 32, views=2)
        direct = vq.encode_codes(to_model_input(views)).numpy()
        s = samples[item.key]
        assert s.codes.dtype == np.uint16 and s.codes.shape == (2, 8, 8)
        assert np.array_equal(s.codes, direct) and s.label == item.label
    assert "." not in "".join(samples)  # WebDataset keys end at the first dot


def test_rerun_is_byte_identical_and_skips_complete_shards(toy_tree, vq_path, tmp_path):
    run(toy_tree, vq_path, tmp_path / "a")
    run(toy_tree, vq_path, tmp_path / "b")
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    again = run(toy_tree, vq_path, tmp_path / "a")
    assert again["inputs_this_run"] == 0


def test_workers_give_the_same_shards(toy_tree, vq_path, tmp_path):
    run(toy_tree, vq_path, tmp_path / "a")
    cfg = TokenizeConfig(data=str(toy_tree), vq=str(vq_path), out=str(tmp_path / "w"), image_size=32,
                         samples_per_shard=8, batch=16, workers=2)
    tokenize(cfg.plan())
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "w")


def test_rank_slices_are_disjoint_and_complete(toy_tree, vq_path, tmp_path):
    ref = tmp_path / "ref"
    run(toy_tree, vq_path, ref)
    out = tmp_path / "ranked"
    c0 = run(toy_tree, vq_path, out, rank=0, world_size=2)
    assert "set" not in c0 and not (out / "manifest.parquet").exists()
    with pytest.raises(ShardSetError, match="missing 2 of 5 shards"):
        finalize(str(out))
    c1 = run(toy_tree, vq_path, out, rank=1, world_size=2)
    assert c1["set"]["samples"] == 34  # the last rank merges
    assert shard_bytes(out) == shard_bytes(ref)
    parts = [json.loads(p.read_text()) for p in sorted((out / ".parts").glob("*.json"))]
    assert [p["rank"] for p in parts] == [0, 1, 0, 1, 0]


def test_resume_after_partial_loss(toy_tree, vq_path, tmp_path):
    out = tmp_path / "s"
    run(toy_tree, vq_path, out)
    ref = shard_bytes(out)
    (out / "train-000002.tar").unlink()
    (out / ".parts" / "train-000001.tar.json").unlink()
    (out / ".train-000003.tar.tmp123").write_bytes(b"half a shard")  # a killed writer's part (atomic_path)
    (out / "train-000004.tar.tmp456").write_bytes(b"half a shard")  # and one of an older npp's
    again = run(toy_tree, vq_path, out)
    assert again["inputs_this_run"] == 16
    assert shard_bytes(out) == ref
    assert not list(out.glob("*.tmp*"))  # pathlib's * matches the hidden part too


@pytest.mark.slow
def test_kill_9_then_rerun_completes_without_duplicates(toy_tree, vq_path, tmp_path):
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "npp", "tokenize", "run", "--data", str(toy_tree), "--vq", str(vq_path),
           "--image-size", "128", "--samples-per-shard", "2", "--batch", "4", "--workers", "0"]
    subprocess.run(cmd + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts, deadline = out / ".parts", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("*.json"))) >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / ".parts").glob("*.json")))
    assert 1 <= done_before < 19, "the run should have been killed part-way"
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)
    assert shard_bytes(out) == shard_bytes(ref)
    keys = [s.key for p in sorted(out.glob("train-*.tar")) for s in iter_tar_samples(p)]
    assert len(keys) == len(set(keys)) == read_meta(out)["samples"]


def _parquet_rows(toy_tree):
    rows = []
    for cls_dir in sorted(toy_tree.iterdir()):
        for f in sorted(cls_dir.glob("*.png"))[:2]:
            rows.append({"image": {"bytes": f.read_bytes(), "path": f.name}, "label": int(cls_dir.name[:2])})
    rows.append({"image": {"bytes": b"garbage", "path": "bad.jpg"}, "label": 1})
    rows.append({"image": {"bytes": rows[0]["image"]["bytes"], "path": "x.png"}, "label": 99})
    return rows


def test_parquet_input(toy_tree, vq_path, tmp_path):
    data = tmp_path / "pq"
    data.mkdir()
    rows = _parquet_rows(toy_tree)
    pq.write_table(pa.Table.from_pylist(rows[:12]), data / "train-00000.parquet", row_group_size=5)
    pq.write_table(pa.Table.from_pylist(rows[12:]), data / "train-00001.parquet", row_group_size=5)
    out = tmp_path / "out"
    cfg = TokenizeConfig(data=str(data), vq=str(vq_path), out=str(out), image_size=32, samples_per_shard=5,
                         batch=8, workers=0, num_classes=10)
    counts = tokenize(cfg.plan())
    assert counts["encoded"] == 20 and counts["failed"] == 2
    reasons = sorted(f["reason"] for f in pq.read_table(out / "failures.parquet").to_pylist())
    assert reasons[0].startswith("label 99 out of range [0, 10)") and reasons[1].startswith("unreadable image")
    # the same images by folder and by parquet give the same codes
    samples = all_samples(out)
    first = samples[f"{unique_key('train-00000')}/000000000"]
    vq, _ = load_vq(vq_path)
    direct = vq.encode_codes(to_model_input(make_views(decode_image(rows[0]["image"]["bytes"]), 32))).numpy()
    assert np.array_equal(first.codes, direct) and first.label == 0


def test_clear_errors_before_any_work(toy_tree, vq_path, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        run(tmp_path / "nowhere", vq_path, tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty is an empty directory"):
        run(tmp_path / "empty", vq_path, tmp_path / "o2")
    (tmp_path / "empty" / "a.jpg").write_bytes(b"x")  # files, but no class folders
    with pytest.raises(UsageError, match="has no class folders and no .parquet files"):
        run(tmp_path / "empty", vq_path, tmp_path / "o2")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), bad / "a.parquet")
    with pytest.raises(SourceError, match="no image column 'image'.*--image-column"):
        run(bad, vq_path, tmp_path / "o3")
    gpt = tmp_path / "gpt.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(1)}}, gpt)
    with pytest.raises(ValueError, match="gpt.pt is a GPT checkpoint, not a VQ tokenizer"):
        run(toy_tree, gpt, tmp_path / "o4")
    out = tmp_path / "o5"
    run(toy_tree, vq_path, out)
    other = tmp_path / "other_vq.pt"
    save_vq(other, seed=1)
    with pytest.raises(ShardSetError, match="another tokenizer.*new --out"):
        run(toy_tree, other, out)


def test_resolve_rank_from_environment(monkeypatch):
    assert resolve_rank(1, 4) == (1, 4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert resolve_rank(None, None) == (2, 3)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert resolve_rank(None, None) == (4, 8)
    with pytest.raises(ValueError, match="outside world size"):
        resolve_rank(4, 4)


def test_toy_dataset_is_deterministic(tmp_path):
    from npp.pipeline.toy import TOY_CLASSES, write_toy_dataset

    write_toy_dataset(str(tmp_path / "a"), per_class=2, size=32, seed=3)
    write_toy_dataset(str(tmp_path / "b"), per_class=2, size=32, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 * len(TOY_CLASSES)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert np.asarray(Image.open(tmp_path / "a" / files[0])).shape == (32, 32, 3)
