"""The shard set's files have one owner (npp.pipeline.shards): tokenize writes them through it, train and the demo
ask it whether a folder is a set and whether it is finished, and the readers get back what was written."""

import json

import pyarrow.parquet as pq
import pytest

from npp.pipeline.shards import (
    FAILURES,
    MANIFEST,
    META,
    VAL_MANIFEST,
    ShardSetError,
    check_or_write_meta,
    finished_meta,
    heldout_shards,
    is_shard_set,
    load_manifest,
    open_shard_sets,
    write_finished_set,
)


def test_a_set_is_finished_by_its_meta_written_last_and_read_back_as_written(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    assert not is_shard_set(out) and finished_meta(out) is None
    meta = {"format_version": 2, "tokenizer": {"checkpoint_sha256": "ab"}, "grid": [8, 8], "samples": 0,
            "complete": False}
    check_or_write_meta(out, meta)
    assert is_shard_set(out) and finished_meta(out) is None  # begun, not finished: train refuses it as --out
    with pytest.raises(ShardSetError, match="npp tokenize finalize"):
        open_shard_sets(str(out))

    rows = [{"file": "train-000000.tar", "samples": 10, "bytes": 2048, "sha256": "c" * 64}]
    val = [{"file": "val-000000.tar", "samples": 2, "bytes": 512, "sha256": "d" * 64}]
    failures = [{"key": "cat/1.jpg", "source": "images", "reason": "truncated JPEG", "shard": "train-000000.tar"}]
    write_finished_set(out, {**meta, "samples": 10, "val_samples": 2}, rows, val, failures)
    assert finished_meta(out)["complete"] is True and json.loads((out / META).read_text())["samples"] == 10
    assert load_manifest(out) == rows and load_manifest(out, VAL_MANIFEST) == val
    assert pq.read_table(out / FAILURES).to_pylist() == failures
    combined, manifest = open_shard_sets(str(out))
    assert combined["samples"] == 10 and manifest == [{**rows[0], "path": str(out / "train-000000.tar")}]
    assert heldout_shards(str(out)) == [{**val[0], "path": str(out / "val-000000.tar")}]

    empty = tmp_path / "all_failed"
    empty.mkdir()
    write_finished_set(empty, meta, [], None, [])  # every input failed: empty tables with their columns
    assert load_manifest(empty) == [] and pq.read_table(empty / MANIFEST).column_names == [
        "file", "samples", "bytes", "sha256"] and not (empty / VAL_MANIFEST).exists()
    assert pq.read_table(empty / FAILURES).column_names == ["key", "source", "reason", "shard"]
