"""Stage 1: images → VQ codes → WebDataset shards.

Inputs are sorted and cut into shards of a fixed number of inputs, so the
assignment is the same on every run and every rank; each rank owns the shards
i with i % world_size == rank. DataLoader workers read and crop images, the main
process encodes them in batches and writes each shard the moment its last input
is resolved. Complete shards are skipped on a rerun, which is how an interrupted
run (kill -9, preemption) resumes. Every input ends up encoded or in the
failures record: encoded + failed = inputs.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from npp.models.checkpoint import load_vq
from npp.pipeline.files import file_sha256
from npp.pipeline.images import ImageDecodeError, decode_image, describe_views, make_views, to_model_input
from npp.pipeline.shards import (
    FORMAT_VERSION,
    Sample,
    ShardSetError,
    atomic_write_json,
    check_or_write_meta,
    read_meta,
    read_part,
    shard_name,
    write_shard,
)
from npp.pipeline.sources import ImageSource, SourceItem, open_source, read_bytes


@dataclass
class TokenizeConfig:
    data: str
    vq: str
    out: str
    image_size: int = 256
    views: int = 2
    ten_crop: bool = False
    crop_range: float = 1.1
    samples_per_shard: int = 1000
    batch: int = 64
    workers: int = 4
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    num_classes: Optional[int] = None
    rank: Optional[int] = None
    world_size: Optional[int] = None
    device: str = "auto"


def resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """Explicit flags, else torchrun's RANK/WORLD_SIZE, else a SLURM array task, else a single process."""
    if rank is not None or world_size is not None:
        r, w = int(rank or 0), int(world_size or 1)
    elif "WORLD_SIZE" in os.environ:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ:
        # array ids may start at any offset (--array=1-8): rank is the position in the array
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        r, w = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        r, w = 0, 1
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside world size {w}")
    return r, w


class _InputDataset(Dataset):
    """Reads and crops one input per index; failures come back as a reason, never an exception."""

    def __init__(self, entries: list[tuple[int, SourceItem]], cfg: TokenizeConfig, num_classes: int):
        self.entries, self.cfg, self.num_classes = entries, cfg, num_classes

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        shard, item = self.entries[i]
        out = {"shard": shard, "item": item, "views": None, "reason": None}
        if not 0 <= item.label < self.num_classes:
            out["reason"] = f"label {item.label} out of range [0, {self.num_classes})"
            return out
        try:
            img = decode_image(read_bytes(item, self.cfg.image_column))
            out["views"] = make_views(img, self.cfg.image_size, self.cfg.views, self.cfg.ten_crop, self.cfg.crop_range)
        except ImageDecodeError as e:
            out["reason"] = f"unreadable image: {e}"
        except OSError as e:
            out["reason"] = f"cannot read file: {e}"
        return out


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_meta(cfg: TokenizeConfig, source: ImageSource, vq_config: dict, vq_sha: str, grid: tuple[int, int]) -> dict:
    num_shards = math.ceil(len(source.items) / cfg.samples_per_shard)
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"config": vq_config, "checkpoint_sha256": vq_sha, "checkpoint": os.path.abspath(cfg.vq)},
        "codebook_size": vq_config["codebook_size"],
        "grid": list(grid),
        "image_size": cfg.image_size,
        "views": describe_views(cfg.views, cfg.ten_crop, cfg.crop_range),
        "source": {"kind": source.kind, "path": os.path.abspath(source.root), "inputs": len(source.items)},
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "split": cfg.split,
        "samples_per_shard": cfg.samples_per_shard,
        "num_shards": num_shards,
        "shard_pattern": f"{cfg.split}-{{000000..{num_shards - 1:06d}}}.tar",
        "complete": False,
    }


def tokenize(cfg: TokenizeConfig) -> dict:
    """Encode this rank's shards; finalize the set if every shard is then complete. Returns counts."""
    if cfg.views not in (1, 2) and not cfg.ten_crop:
        raise ValueError(f"--views must be 1 or 2 (or use --ten-crop), got {cfg.views}")
    source = open_source(cfg.data, cfg.image_column, cfg.label_column, cfg.num_classes)
    vq, _ = load_vq(cfg.vq)
    if cfg.image_size % vq.downsample:
        raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the tokenizer's downsampling {vq.downsample}")
    grid = (cfg.image_size // vq.downsample,) * 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = build_meta(cfg, source, vq.config.to_dict(), file_sha256(cfg.vq), grid)
    check_or_write_meta(out, meta)
    rank, world = resolve_rank(cfg.rank, cfg.world_size)

    sps, n_shards = cfg.samples_per_shard, meta["num_shards"]
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if read_part(out, shard_name(cfg.split, i)) is None]
    for stale in out.glob(f"{cfg.split}-*.tar.tmp*"):  # leftovers of a killed run
        stale.unlink(missing_ok=True)
    entries = [(i, item) for i in todo for item in source.items[i * sps : (i + 1) * sps]]
    print(
        f"tokenize: {len(source.items)} inputs in {n_shards} shards; rank {rank}/{world} owns {len(mine)}, "
        f"{len(mine) - len(todo)} already complete, {len(todo)} to do"
    )

    device = pick_device(cfg.device)
    vq = vq.to(device)
    per_batch = max(1, cfg.batch // (10 if cfg.ten_crop else cfg.views))
    loader = DataLoader(
        _InputDataset(entries, cfg, source.num_classes),
        batch_size=per_batch,
        num_workers=cfg.workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    expected = {i: len(source.items[i * sps : (i + 1) * sps]) for i in todo}
    pending: dict[int, dict] = {i: {"samples": [], "failures": [], "seen": 0} for i in todo}
    encoded = failed = 0
    # Shards are written on a thread so the encoder does not wait for tar building and fsync.
    writer, writes = ThreadPoolExecutor(max_workers=1), []
    with writer, tqdm(total=len(entries), desc=f"tokenize rank {rank}", unit="img") as bar:
        for batch in loader:
            ok = [b for b in batch if b["views"] is not None]
            codes = encode_batch(vq, [b["views"] for b in ok], device) if ok else []
            for b, c in zip(ok, codes):
                pending[b["shard"]]["samples"].append((b["item"], c))
            for b in batch:
                state = pending[b["shard"]]
                state["seen"] += 1
                if b["reason"] is not None:
                    state["failures"].append({"key": b["item"].key, "source": b["item"].source, "reason": b["reason"]})
                if state["seen"] == expected[b["shard"]]:
                    encoded += len(state["samples"])
                    failed += len(state["failures"])
                    writes.append(writer.submit(_flush, out, cfg.split, b["shard"], pending.pop(b["shard"]), rank))
            bar.update(len(batch))
            bar.set_postfix(failed=failed)
        for w in writes:
            w.result()  # re-raise a failed write here
    counts = {"inputs_this_run": len(entries), "encoded": encoded, "failed": failed}
    print(f"tokenize rank {rank}: encoded {encoded} + failed {failed} = {encoded + failed} of {len(entries)} inputs this run")
    if all(read_part(out, shard_name(cfg.split, i)) is not None for i in range(n_shards)):
        counts["set"] = finalize(cfg.out)
    elif world > 1:
        print("other ranks' shards are not all complete yet: the last rank to finish (or `npp tokenize finalize`) merges them")
    return counts


def encode_batch(vq, views: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
    """Encode the views of several inputs in one forward; returns uint16 (views, h, w) per input."""
    counts = [v.shape[0] for v in views]
    x = to_model_input(np.concatenate(views)).to(device)
    codes = vq.encode_codes(x).cpu().numpy().astype(np.uint16)
    return np.split(codes, np.cumsum(counts)[:-1])


def _flush(out: Path, split: str, shard: int, state: dict, rank: int) -> None:
    samples = [Sample(item.key, codes, item.label) for item, codes in state["samples"]]
    write_shard(out, shard_name(split, shard), samples, state["failures"], extra={"rank": rank})


def finalize(out_dir: str) -> dict:
    """Merge every shard's part record into manifest.parquet, failures.parquet and the final meta.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    meta = read_meta(out)
    names = [shard_name(meta["split"], i) for i in range(meta["num_shards"])]
    parts = {n: read_part(out, n) for n in names}
    missing = [n for n, p in parts.items() if p is None]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ShardSetError(
            f"{out} is missing {len(missing)} of {len(names)} shards ({shown}): rerun `npp tokenize run` "
            "for the ranks that own them (the same command resumes)"
        )
    manifest = [{k: parts[n][k] for k in ("file", "samples", "bytes", "sha256")} for n in names]
    failures = [{**f, "shard": n} for n in names for f in parts[n]["failures"]]
    encoded = sum(m["samples"] for m in manifest)
    inputs = meta["source"]["inputs"]
    if encoded + len(failures) != inputs:
        raise ShardSetError(f"{out}: encoded {encoded} + failed {len(failures)} != {inputs} inputs; delete {out} and rerun")
    _write_parquet(out / "manifest.parquet", pa.Table.from_pylist(manifest, schema=pa.schema(
        [("file", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])), pq)
    _write_parquet(out / "failures.parquet", pa.Table.from_pylist(failures, schema=pa.schema(
        [("key", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("shard", pa.string())])), pq)
    meta.update({"samples": encoded, "failures": len(failures), "complete": True})
    atomic_write_json(out / "meta.json", meta)
    print(f"shard set {out}: {encoded} samples in {len(names)} shards, {len(failures)} failures "
          f"(encoded {encoded} + failed {len(failures)} = {inputs} inputs)")
    return {"samples": encoded, "failures": len(failures), "shards": len(names)}


def _write_parquet(path: Path, table, pq) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
