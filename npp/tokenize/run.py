"""Stage 1: images → VQ codes → WebDataset shards.

Inputs are dealt to shards in a seeded permutation of the whole (sorted) input list,
so every shard is a uniform sample of the classes even though ImageFolder lists them
class by class; the permutation's seed is in meta.json and every rank computes the
same one. Each rank owns the shards i with i % world_size == rank. DataLoader
workers read and crop images, the main process encodes them in batches and writes
each shard the moment its last input is resolved. Complete shards are skipped on a
rerun, which is how an interrupted run (kill -9, preemption) resumes. Every input
ends up encoded or in the failures record: encoded + failed = inputs. A shard whose
inputs all failed is not written (no empty tars); meta.json lists it.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from npp.errors import ConfigError
from npp.models.checkpoint import load_vq
from npp.pipeline.images import (
    ImageDecodeError,
    decode_image,
    describe_views,
    deterministic_reason,
    make_views,
    to_model_input,
)
from npp.pipeline.shards import (
    FORMAT_VERSION,
    VAL_SPLIT,
    Sample,
    ShardSetError,
    check_or_write_meta,
    manifest_digest,
    read_meta,
    read_part,
    shard_name,
    write_finished_set,
    write_shard,
)
from npp.pipeline.sources import ImageSource, SourceItem, listing_sha256, open_source, read_bytes
from npp.runtime.devices import fast_matmul, pick_device
from npp.runtime.files import file_sha256
from npp.runtime.ranks import rank_and_world
from npp.runtime.workers import WorkerInit
from npp.tokenize.config import TokenizeConfig, auto_workers

__all__ = ["TokenizeConfig", "tokenize", "finalize", "resolve_rank", "shard_assignment"]

# Parquet rows are read in file order within a window of shards (random reads would
# decode a whole row group per image); the window holds at most this many code bytes.
WINDOW_BYTES = 2 << 30


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit flags, else the job's ranks (torchrun, srun), else a SLURM array task, else a single process."""
    if rank is not None or world_size is not None:
        r, w = int(rank or 0), int(world_size or 1)
    elif rank_and_world()[1] > 1:  # torchrun or srun (npp.runtime.ranks)
        r, w = rank_and_world()
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ:
        # array ids may start at any offset (--array=1-8): rank is the position in the array
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        r, w = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        r, w = 0, 1
    if not 0 <= r < w:
        raise ConfigError(f"rank {r} is outside world size {w}")
    return r, w


class _InputDataset(Dataset):
    """Reads and crops one input per index; failures come back as a reason, never an exception."""

    def __init__(self, entries: list[tuple[int, int, SourceItem]], cfg: TokenizeConfig, num_classes: int):
        self.entries, self.cfg, self.num_classes = entries, cfg, num_classes

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        shard, pos, item = self.entries[i]
        out = {"shard": shard, "pos": pos, "item": item, "views": None, "reason": None}
        if not 0 <= item.label < self.num_classes:
            out["reason"] = f"label {item.label} out of range [0, {self.num_classes})"
            return out
        try:
            img = decode_image(read_bytes(item, self.cfg.image_column))
            out["views"] = make_views(img, self.cfg.image_size, self.cfg.views, self.cfg.ten_crop, self.cfg.crop_range)
        except ImageDecodeError as e:
            out["reason"] = f"unreadable image: {e}"
        except OSError as e:
            out["reason"] = deterministic_reason(f"cannot read file: {e}")
        return out


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def shard_assignment(n_inputs: int, samples_per_shard: int, seed: int) -> list[np.ndarray]:
    """Input indices of each shard: consecutive slices of a seeded permutation of all inputs."""
    order = np.random.default_rng([seed, n_inputs]).permutation(n_inputs)
    return [order[i : i + samples_per_shard] for i in range(0, n_inputs, samples_per_shard)]


def held_out_count(n_inputs: int, val_share: float) -> int:
    """Inputs held out for --val-share: at least one when the share is positive, never all."""
    return 0 if val_share <= 0 else min(n_inputs - 1, max(1, round(val_share * n_inputs)))


def shard_plan(n_inputs: int, samples_per_shard: int, seed: int, split: str, val_share: float = 0.0
               ) -> list[tuple[str, np.ndarray]]:
    """(shard name, input indices) of every shard: the training shards, then the held-out ones.

    Without --val-share the training shards are `shard_assignment`'s (a set made before held-out splits
    existed is resumed as it was). With it, a seeded choice of `held_out_count` inputs goes to `val-*` shards and
    the rest is dealt to the training shards in a seeded permutation, as always."""
    n_val = held_out_count(n_inputs, val_share)
    if not n_val:
        return [(shard_name(split, i), ids) for i, ids in enumerate(shard_assignment(n_inputs, samples_per_shard,
                                                                                         seed))]
    held = np.random.default_rng([seed, n_inputs, n_val]).permutation(n_inputs)[:n_val]
    kept = np.setdiff1d(np.arange(n_inputs), held)
    train = [kept[ids] for ids in shard_assignment(len(kept), samples_per_shard, seed)]
    val = [held[i : i + samples_per_shard] for i in range(0, n_val, samples_per_shard)]
    return [(shard_name(split, i), ids) for i, ids in enumerate(train)] + \
        [(shard_name(VAL_SPLIT, i), ids) for i, ids in enumerate(val)]


def build_meta(cfg: TokenizeConfig, source: ImageSource, vq_config: dict, vq_sha: str, grid: tuple[int, int]) -> dict:
    n_val = held_out_count(len(source.items), float(cfg.val_share))
    num_shards = math.ceil((len(source.items) - n_val) / cfg.samples_per_shard)
    val_shards = math.ceil(n_val / cfg.samples_per_shard)
    held_out = {"val": {"share": float(cfg.val_share), "inputs": n_val, "num_shards": val_shards,
                        "choice": "seeded choice of the inputs (the assignment's seed), never trained on",
                        "shard_pattern": f"{VAL_SPLIT}-{{000000..{val_shards - 1:06d}}}.tar"}} if n_val else {}
    return {
        "format_version": FORMAT_VERSION,
        # identity by content: the same checkpoint copied elsewhere is the same tokenizer
        "tokenizer": {"config": vq_config, "checkpoint_sha256": vq_sha},
        "tokenizer_path": os.path.abspath(cfg.vq),
        "codebook_size": vq_config["codebook_size"],
        "grid": list(grid),
        "image_size": cfg.image_size,
        "views": describe_views(cfg.views, cfg.ten_crop, cfg.crop_range),
        "source": {"kind": source.kind, "inputs": len(source.items), "listing_sha256": listing_sha256(source.items)},
        "source_path": os.path.abspath(source.root),
        "assignment": {"order": "seeded permutation of the sorted input list", "seed": cfg.seed},
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "split": cfg.split,
        "samples_per_shard": cfg.samples_per_shard,
        "num_shards": num_shards,
        "shard_pattern": f"{cfg.split}-{{000000..{num_shards - 1:06d}}}.tar",
        "complete": False,
        **held_out,
    }


def tokenize(cfg: TokenizeConfig) -> dict:
    """Encode this rank's shards; finalize the set if every shard is then complete. Returns counts. `cfg`: its
    plan (TokenizeConfig.plan(), checked before torch is imported; nothing here checks the flags again)."""
    workers = auto_workers(cfg.workers)
    source = open_source(cfg.data, cfg.image_column, cfg.label_column, cfg.num_classes)
    vq, _ = load_vq(cfg.vq)
    if cfg.image_size % vq.downsample:
        raise ShardSetError(
            f"--image-size {cfg.image_size} is not a multiple of the tokenizer's downsampling {vq.downsample}"
        )
    grid = (cfg.image_size // vq.downsample,) * 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = build_meta(cfg, source, vq.config.to_dict(), file_sha256(cfg.vq), grid)
    check_or_write_meta(out, meta)
    rank, world = resolve_rank(cfg.rank, cfg.world_size)

    planned = shard_plan(len(source.items), cfg.samples_per_shard, cfg.seed, cfg.split, float(cfg.val_share))
    names, shards = [name for name, _ in planned], [ids for _, ids in planned]
    mine = [i for i in range(len(planned)) if i % world == rank]
    todo = [i for i in mine if read_part(out, names[i]) is None]
    for split in {cfg.split, VAL_SPLIT}:
        for pattern in (f".{split}-*.tar.tmp*", f"{split}-*.tar.tmp*"):  # a killed run's parts (an older npp's)
            for stale in out.glob(pattern):
                stale.unlink(missing_ok=True)
    entries = read_order(source, shards, todo, meta["views"]["views"] * grid[0] * grid[1] * 2)
    held = f" + {meta['val']['num_shards']} held-out ({meta['val']['inputs']} inputs)" if meta.get("val") else ""
    print(
        f"tokenize: {len(source.items)} inputs in {meta['num_shards']} shards{held} (seeded permutation, seed "
        f"{cfg.seed}); rank {rank}/{world} owns {len(mine)}, {len(mine) - len(todo)} already complete, {len(todo)} "
        "to do"
    )

    device = pick_device(cfg.device)  # this rank's GPU under torchrun/srun
    fast_matmul(device)
    vq = vq.to(device)
    per_batch = max(1, cfg.batch // meta["views"]["views"])
    loader = DataLoader(
        _InputDataset(entries, cfg, source.num_classes),
        batch_size=per_batch,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=WorkerInit() if workers > 0 else None,
    )
    expected = {i: len(shards[i]) for i in todo}
    pending: dict[int, dict] = {i: {"samples": [], "failures": [], "seen": 0} for i in todo}
    encoded = failed = 0
    # Shards are written on a thread so the encoder does not wait for tar building and fsync.
    writer, writes = ThreadPoolExecutor(max_workers=1), []
    with writer, tqdm(total=len(entries), desc=f"tokenize rank {rank}", unit="img") as bar:
        for batch in loader:
            ok = [b for b in batch if b["views"] is not None]
            codes = encode_batch(vq, [b["views"] for b in ok], device) if ok else []
            for b, c in zip(ok, codes, strict=False):
                pending[b["shard"]]["samples"].append((b["pos"], b["item"], c))
            for b in batch:
                state = pending[b["shard"]]
                state["seen"] += 1
                if b["reason"] is not None:
                    state["failures"].append(
                        (b["pos"], {"key": b["item"].key, "source": b["item"].source, "reason": b["reason"]}))
                if state["seen"] == expected[b["shard"]]:
                    encoded += len(state["samples"])
                    failed += len(state["failures"])
                    writes.append(writer.submit(_flush, out, names[b["shard"]], pending.pop(b["shard"]), rank))
            bar.update(len(batch))
            bar.set_postfix(failed=failed, refresh=False)  # refresh=True would defeat TQDM_MININTERVAL
        for w in writes:
            w.result()  # re-raise a failed write here
    counts = {"inputs_this_run": len(entries), "encoded": encoded, "failed": failed}
    print(
        f"tokenize rank {rank}: encoded {encoded} + failed {failed} = {encoded + failed} of {len(entries)} inputs "
        "this run"
    )
    if all(read_part(out, name) is not None for name in names):
        counts["set"] = finalize(cfg.out)
    elif world > 1:
        print(
            "other ranks' shards are not all complete yet: the last rank to finish (or `npp tokenize finalize`) "
            "merges them"
        )
    return counts


def read_order(
    source: ImageSource, shards: list[np.ndarray], todo: list[int], code_bytes: int
) -> list[tuple[int, int, SourceItem]]:
    """(shard, position in shard, item) in the order to read them.

    Image files are read shard by shard, so shards complete (and a killed run keeps
    them) as the run goes. Parquet rows are read in file order inside windows of
    shards that fit WINDOW_BYTES of codes: reading them in permuted order would decode
    a row group per image.
    """
    entries = [(i, p, source.items[j]) for i in todo for p, j in enumerate(shards[i])]
    if source.kind != "parquet" or not entries:
        return entries
    per_window = max(1, WINDOW_BYTES // max(1, code_bytes * len(shards[todo[0]])))
    window_of = {shard: n // per_window for n, shard in enumerate(todo)}
    return sorted(entries, key=lambda e: (window_of[e[0]], e[2].path, e[2].row))


def encode_batch(vq, views: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
    """Encode the views of several inputs in one forward; returns uint16 (views, h, w) per input."""
    counts = [v.shape[0] for v in views]
    x = to_model_input(np.concatenate(views)).to(device)
    codes = vq.encode_codes(x).cpu().numpy().astype(np.uint16)
    return np.split(codes, np.cumsum(counts)[:-1])


def _flush(out: Path, name: str, state: dict, rank: int) -> None:
    """Write a shard with its samples in assignment order, whatever order they were read in."""
    samples = [Sample(item.key, codes, item.label) for _, item, codes in sorted(state["samples"], key=lambda s: s[0])]
    failures = [f for _, f in sorted(state["failures"], key=lambda f: f[0])]
    write_shard(out, name, samples, failures, extra={"rank": rank})


def finalize(out_dir: str) -> dict:
    """Merge every shard's part record into manifest.parquet, failures.parquet and the final meta.json."""
    out = Path(out_dir)
    meta = read_meta(out)
    names = [shard_name(meta["split"], i) for i in range(meta["num_shards"])]
    val_names = [shard_name(VAL_SPLIT, i) for i in range((meta.get("val") or {}).get("num_shards", 0))]
    parts = {n: read_part(out, n) for n in names + val_names}
    missing = [n for n, p in parts.items() if p is None]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ShardSetError(
            f"{out} is missing {len(missing)} of {len(names)} shards ({shown}): rerun `npp tokenize run` "
            "for the ranks that own them (the same command resumes)"
        )
    # shards whose every input failed were never written: they stay out of the manifest
    empty = [n for n in names + val_names if parts[n]["samples"] == 0]
    rows = {n: {k: parts[n][k] for k in ("file", "samples", "bytes", "sha256")} for n in names + val_names
            if n not in empty}
    manifest, val_manifest = [rows[n] for n in names if n in rows], [rows[n] for n in val_names if n in rows]
    failures = [{**f, "shard": n} for n in names + val_names for f in parts[n]["failures"]]
    encoded = sum(m["samples"] for m in manifest)
    held = sum(m["samples"] for m in val_manifest)
    inputs = meta["source"]["inputs"]
    if encoded + held + len(failures) != inputs:
        raise ShardSetError(
            f"{out}: encoded {encoded} + held out {held} + failed {len(failures)} != {inputs} inputs; delete {out} "
            "and rerun"
        )
    if val_names:
        meta.update({"val_samples": held, "val_shards": len(val_manifest),  # beside "val", the plan (identity)
                     "val_digest": manifest_digest(val_manifest)})
    meta.update({"samples": encoded, "failures": len(failures), "shards": len(manifest), "empty_shards": empty})
    if empty:  # the brace pattern would name missing files: readers take the list from manifest.parquet
        meta["shard_pattern"] = None
    write_finished_set(out, meta, manifest, val_manifest if val_names else None, failures)
    if empty:
        print(f"{len(empty)} shard(s) had no readable input and were not written: {', '.join(empty[:5])}")
    print(f"shard set {out}: {encoded} samples in {len(manifest)} shards"
          + (f", {held} held out in {len(val_manifest)} {VAL_SPLIT} shards" if val_names else "")
          + f", {len(failures)} failures (encoded {encoded + held} + failed {len(failures)} = {inputs} inputs)")
    return {"samples": encoded, "failures": len(failures), "shards": len(names)}

