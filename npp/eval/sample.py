"""Class-balanced (or random-label) guided sampling to ADM-layout `.npz` files.

Samples are made in pieces of `--batch`; piece p always has the same labels and
the seed `seed·1000003 + p`, so the result does not depend on how many processes
made it. Ranks (torchrun's RANK/WORLD_SIZE) take the pieces p with
p % world == rank; a piece is written atomically, so an interrupted run resumes
from the pieces it has; the process that finds every piece present merges them
into `samples_cfg<scale>.npz` (`arr_0` uint8 N×H×W×3, `labels`), a PNG grid (a row
per class) and a JSON record of every setting that changes a FID.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from npp.errors import ConfigError
from npp.eval.config import SampleConfig
from npp.models.checkpoint import load_gpt, load_vq
from npp.models.generate import generate
from npp.pipeline.devices import fast_matmul, pick_device
from npp.pipeline.files import file_sha256
from npp.pipeline.images import to_uint8_images


def cfg_scales(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(v) for v in str(value).strip("[]() ").split(",") if v.strip()]


def sample_labels(cfg: SampleConfig, num_classes: int) -> np.ndarray:
    if cfg.labels == "balanced":
        return np.repeat(np.arange(num_classes), cfg.per_class)
    if cfg.labels == "random":
        n = cfg.num_samples or cfg.per_class * num_classes
        return np.random.default_rng(cfg.seed).integers(0, num_classes, n)
    raise ConfigError(f"--labels must be balanced or random, got {cfg.labels!r}")


def scale_dir(out: Path, scale: float) -> Path:
    return out / f"cfg{scale:g}"


def samples_path(out: str | Path, scale: float) -> Path:
    return Path(out) / f"samples_cfg{scale:g}.npz"


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def sample(cfg: SampleConfig) -> list[str]:
    """Generate (or finish) the samples of every cfg scale; returns the merged .npz paths made here."""
    device = pick_device(cfg.device)  # this rank's GPU under torchrun/srun
    fast_matmul(device)
    model, ckpt = load_gpt(cfg.ckpt, use_ema=cfg.ema)
    vq, _ = load_vq(cfg.vq)
    mc = model.config
    if vq.config.codebook_size != mc.vocab_size:
        raise ConfigError(f"{cfg.vq} has {vq.config.codebook_size} codes but {cfg.ckpt} expects vocab {mc.vocab_size}: "
                         "use the tokenizer the model was trained with")
    model, vq = model.to(device).eval(), vq.to(device).eval()
    if cfg.precision == "bf16":  # weights and the KV cache in bf16: half the cache (GPT-XXL, batch 64, CFG: 9.7 GB)
        model = model.to(torch.bfloat16)
    labels = sample_labels(cfg, mc.num_classes)
    pieces = (len(labels) + cfg.batch - 1) // cfg.batch
    rank, world = _rank()
    out = Path(cfg.out)
    made = []
    for scale in cfg_scales(cfg.cfg_scale):
        pdir = scale_dir(out, scale)
        pdir.mkdir(parents=True, exist_ok=True)
        todo = [p for p in range(pieces) if p % world == rank and not (pdir / f"piece_{p:06d}.npz").exists()]
        for p in tqdm(todo, desc=f"sample cfg={scale:g} rank {rank}", unit="batch"):
            lab = torch.from_numpy(labels[p * cfg.batch : (p + 1) * cfg.batch]).to(device)
            codes = generate(model, lab, cfg_scale=scale, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, cfg_interval=cfg.cfg_interval, seed=cfg.seed * 1000003 + p)
            images = to_uint8_images(vq.decode_codes(codes).float())
            tmp = pdir / f".piece_{p:06d}.tmp{os.getpid()}.npz"
            np.savez(tmp, arr_0=images, labels=lab.cpu().numpy())
            os.replace(tmp, pdir / f"piece_{p:06d}.npz")
        if all((pdir / f"piece_{p:06d}.npz").exists() for p in range(pieces)):
            made.append(str(merge(cfg, scale, pieces, ckpt, labels)))
        else:
            print(f"cfg={scale:g}: other ranks' pieces are still missing; the last rank to finish merges")
    return made


def merge(cfg: SampleConfig, scale: float, pieces: int, ckpt: dict, labels: np.ndarray) -> Path:
    pdir = scale_dir(Path(cfg.out), scale)
    parts = [np.load(pdir / f"piece_{p:06d}.npz") for p in range(pieces)]
    images = np.concatenate([z["arr_0"] for z in parts])
    got_labels = np.concatenate([z["labels"] for z in parts])
    if not np.array_equal(got_labels, labels):
        raise ConfigError(f"pieces in {pdir} were made with other labels: delete {pdir} and sample again")
    target = samples_path(cfg.out, scale)
    tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, arr_0=images, labels=got_labels)
    os.replace(tmp, target)
    save_grid(images, got_labels, target.with_suffix(".png"), cfg.grid_classes, cfg.grid_per_class)
    record = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("out", "device")},
        "cfg_scale": scale, "count": int(len(images)), "image_size": int(images.shape[1]),
        "ckpt_steps": ckpt.get("steps"), "ckpt_train": ckpt.get("train"),
        "ckpt_sha256": file_sha256(cfg.ckpt), "vq_sha256": file_sha256(cfg.vq),
    }
    target.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
    print(f"samples {target}: {len(images)} images {images.shape[1]}px, cfg={scale:g}, grid {target.with_suffix('.png')}")
    return target


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, classes: int = 16, per_class: int = 8) -> None:
    """A row per class (the first `classes` classes), `per_class` samples each."""
    rows = []
    h, w = images.shape[1:3]
    for c in sorted(set(labels.tolist()))[:classes]:
        idx = np.flatnonzero(labels == c)[:per_class]
        row = np.full((h, w * per_class, 3), 255, np.uint8)
        for j, i in enumerate(idx):
            row[:, j * w : (j + 1) * w] = images[i]
        rows.append(row)
    grid = np.concatenate(rows)
    scale = max(1, 256 // w)  # small images are hard to see: enlarge without smoothing
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
