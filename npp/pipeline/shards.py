"""The shard-set contract between tokenize, train and eval (docs/contracts.md).

    <dir>/meta.json            format version, tokenizer identity, grid, views, classes, counts
    <dir>/manifest.parquet     one row per shard: file, samples, bytes, sha256
    <dir>/failures.parquet     one row per input that could not be encoded: key, source, reason, shard
    <dir>/<split>-%06d.tar     WebDataset samples: <key>.codes.npy (uint16 views×h×w), <key>.cls

Tars are written byte-deterministically (fixed member order, mtime, owner, mode)
to a temporary name and renamed when complete; a small part record in
`<dir>/.parts/` (written after the tar) marks the shard done and carries its
failures, so a rerun skips it and `finalize` can merge every rank's work.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npp.errors import NppError
from npp.runtime.files import atomic_path, atomic_write_bytes, atomic_write_json

# 2: inputs dealt to shards in a seeded permutation, keys with a path hash, no empty shards
FORMAT_VERSION = 2
PARTS_DIR = ".parts"
VAL_SPLIT = "val"  # the held-out split's shard prefix (`npp tokenize run --val-share`)
META = "meta.json"
MANIFEST = "manifest.parquet"
VAL_MANIFEST = "val_manifest.parquet"
FAILURES = "failures.parquet"


class ShardSetError(NppError, ValueError):
    """A shard set that cannot be used as asked; the message says what to do."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass
class Sample:
    key: str
    codes: np.ndarray  # uint16 (views, h, w)
    label: int


def encode_tar(samples: list[Sample]) -> bytes:
    """The bytes of a WebDataset tar holding these samples, in order, written by webdataset's own TarWriter.

    Deterministic (the same samples give the same bytes): mtime 0, no user or group names, mode 0644, and
    the values encoded here (`np.save` without pickle; the label as decimal text), not by the writer.
    """
    import webdataset

    buf = io.BytesIO()
    writer = webdataset.TarWriter(buf, user="", group="", mode=0o644, mtime=0, encoder=False)
    for s in samples:
        if "." in s.key:
            raise ValueError(f"sample key {s.key!r} contains a dot: WebDataset would split it")
        writer.write({"__key__": s.key, "codes.npy": _npy_bytes(np.ascontiguousarray(s.codes, dtype=np.uint16)),
                      "cls": str(int(s.label)).encode()})
    writer.close()  # the end-of-archive blocks; the buffer stays ours
    return buf.getvalue()


def write_shard(out: Path, name: str, samples: list[Sample], failures: list[dict], extra: dict | None = None) -> dict:
    """Write one complete shard (tar, then its part record) and return the record.

    A shard without samples (every input failed) gets only its part record: an empty
    tar is refused by webdataset ("No samples found").
    """
    data = encode_tar(samples) if samples else b""
    if samples:
        atomic_write_bytes(out / name, data)
    record = {
        "file": name,
        "samples": len(samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest() if samples else "",
        "failures": failures,
        **(extra or {}),
    }
    (out / PARTS_DIR).mkdir(exist_ok=True)
    atomic_write_json(out / PARTS_DIR / f"{name}.json", record)
    return record


def read_part(out: Path, name: str) -> dict | None:
    """The part record of a complete shard, or None if the shard must be (re)made."""
    part = out / PARTS_DIR / f"{name}.json"
    if not part.exists():
        return None
    try:
        record = json.loads(part.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("samples") == 0:
        return record
    if not (out / name).exists():
        return None
    return record if (out / name).stat().st_size == record.get("bytes") else None


def iter_tar_samples(path: str | os.PathLike) -> Iterator[Sample]:
    """Samples of one shard, in order (plain tarfile; the trainer has its own fast reader)."""
    with tarfile.open(path, "r") as tar:
        pending: dict[str, dict] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            entry = pending.setdefault(key, {})
            entry[ext] = data
            if "codes.npy" in entry and "cls" in entry:
                del pending[key]
                yield Sample(key, np.load(io.BytesIO(entry["codes.npy"])), int(entry["cls"]))


# --- meta -----------------------------------------------------------------------

# Fields that must agree between runs writing into the same directory. They hold
# content identities (checkpoint sha256, the source's key/label listing), never paths:
# the same tokenizer copied elsewhere, or the data reached through a symlink, matches.
IDENTITY_FIELDS = ("format_version", "tokenizer", "image_size", "grid", "views", "source", "assignment",
                   "samples_per_shard", "split", "val")


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether a directory holds a shard set, finished or not (a run folder or an image tree does not)."""
    return (Path(path) / META).exists() or (Path(path) / MANIFEST).exists()


def finished_meta(out: str | os.PathLike) -> dict | None:
    """The meta of a finalized shard set, or None for a directory that holds none (yet)."""
    path = Path(out) / META
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    return meta if meta.get("complete") else None


def read_meta(out: str | os.PathLike) -> dict:
    path = Path(out) / META
    if not path.exists():
        raise ShardSetError(f"{out} is not a shard set (no meta.json): run `npp tokenize run` first")
    return json.loads(path.read_text())


def source_path(meta: dict) -> str | None:
    """Where a shard set's images came from: format 1 kept the path inside "source", format 2 beside it (the
    identity holds no paths)."""
    return meta.get("source_path") or meta.get("source", {}).get("path")


def check_or_write_meta(out: Path, meta: dict) -> None:
    """Write meta.json for a new set; for an existing one, refuse if it was made differently."""
    path = out / META
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [f for f in IDENTITY_FIELDS if old.get(f) != meta.get(f)]
        if diffs:
            hint = (
                "it was made with another tokenizer"
                if "tokenizer" in diffs
                else f"it was made with other settings ({', '.join(diffs)})"
            )
            raise ShardSetError(f"{out} already holds shards but {hint}: use a new --out directory or delete {out}")
        return
    atomic_write_json(path, meta)


def write_finished_set(out: Path, meta: dict, manifest: list[dict], val_manifest: list[dict] | None,
                       failures: list[dict]) -> None:
    """The files that make a shard set finished: its manifests, its failures and, last, its meta with
    `complete` (a set whose meta says complete has every other file). `val_manifest`: None for a set made
    without a held-out split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(name: str, rows: list[dict], schema) -> None:
        with atomic_path(out / name) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)

    shard_schema = pa.schema([("file", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()),
                              ("sha256", pa.string())])
    write(MANIFEST, manifest, shard_schema)
    if val_manifest is not None:
        write(VAL_MANIFEST, val_manifest, shard_schema)
    write(FAILURES, failures, pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                                         ("shard", pa.string())]))
    atomic_write_json(out / META, {**meta, "complete": True})


def manifest_digest(rows: list[dict]) -> str:
    """The content of a list of shards: a digest of their sha256s, in order."""
    return hashlib.sha256("".join(m["sha256"] for m in rows).encode()).hexdigest()[:16]


def load_manifest(out: str | os.PathLike, name: str = MANIFEST) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(out) / name
    if not path.exists():
        raise ShardSetError(
            f"{out} has no {name}: the tokenize run is incomplete, run `npp tokenize finalize`"
        )
    return pq.read_table(path).to_pylist()


def resolve_shard_dirs(spec: str) -> list[str]:
    """`A`, `A,B` or globs (`shards/in256-*`) → shard-set directories, in the order given (globs sorted)."""
    import glob

    dirs: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if any(c in part for c in "*?["):
            found = sorted(d for d in glob.glob(part) if (Path(d) / META).exists())
            if not found:
                raise ShardSetError(f"--shards pattern {part!r} matches no shard set (no directory with meta.json)")
            dirs += found
        else:
            dirs.append(part)
    if not dirs:
        raise ShardSetError("--shards is empty: pass a shard-set directory, a comma list, or a glob")
    if len(set(map(os.path.realpath, dirs))) != len(dirs):
        raise ShardSetError(f"--shards names a shard set twice: {dirs}")
    return dirs


# What must agree between shard sets trained on together: the same codes mean the same thing.
COMPATIBLE_FIELDS = ("tokenizer", "codebook_size", "grid", "image_size", "num_classes", "class_names")


def open_shard_sets(spec: str) -> tuple[dict, list[dict]]:
    """The combined meta and manifest of one or several finalized shard sets made for the same model.

    Manifest rows gain `path`; the combined meta's `samples` is the sum (the epoch is
    all sets together) and `sets` lists the directories. Views may differ between
    sets (e.g. a 2-view set and NPP's 20-view ten-crop set): training picks a view
    per sample from whatever the sample holds.
    """
    dirs = resolve_shard_dirs(spec)
    metas, manifest = [], []
    for d in dirs:
        meta = read_meta(d)
        if not meta.get("complete"):
            raise ShardSetError(f"{d} is not finalized: run `npp tokenize finalize --out {d}`")
        for row in load_manifest(d):
            manifest.append({**row, "path": os.path.join(d, row["file"])})
        metas.append(meta)
    first = metas[0]
    for d, meta in zip(dirs[1:], metas[1:], strict=False):
        diffs = [f for f in COMPATIBLE_FIELDS if meta.get(f) != first.get(f)]
        if diffs:
            raise ShardSetError(
                f"shard sets {dirs[0]} and {d} differ in {', '.join(diffs)}: sets trained on together must be made "
                "with the same tokenizer, image size and class list"
            )
    combined = {**first, "samples": sum(m["samples"] for m in metas), "sets": dirs,
                "val_samples": sum(m.get("val_samples", 0) for m in metas)}
    if len(dirs) > 1:
        combined["views"] = [m["views"] for m in metas]
    return combined, manifest


def heldout_shards(spec: str) -> list[dict]:
    """The held-out shards of the shard set(s) (`--val-share`), rows of their val manifests with `path`; none
    for sets made without a held-out split."""
    rows = []
    for d in resolve_shard_dirs(spec):
        if read_meta(d).get("val_samples"):
            rows += [{**row, "path": os.path.join(d, row["file"])} for row in load_manifest(d, VAL_MANIFEST)]
    return rows
