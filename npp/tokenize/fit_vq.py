"""Fit a small VQ tokenizer (LlamaGen's architecture, narrow) on a folder of images.

For datasets without a pretrained tokenizer, such as the toy set: reconstruction
(MSE + L1), codebook and commitment losses, Adam, a budget in steps (the same
tokenizer on any machine; `minutes` adds an optional wall-clock cap, which makes the
result depend on the machine's speed and is off by default).
Dead codes are re-seeded from current encoder outputs so the small codebook stays
in use. Writes a LlamaGen-format checkpoint (`{"model": state_dict}`, plus our
"config") and a PNG of originals above reconstructions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from npp.errors import ConfigError
from npp.models.vq import VQModel, vq_config
from npp.pipeline.images import ImageDecodeError, center_crop_adm, decode_image, to_model_input, to_uint8_images
from npp.pipeline.sources import open_source, read_bytes
from npp.tokenize.config import FitVQConfig


def load_images(data: str, image_size: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All readable images of a source, center-cropped: uint8 (N, S, S, 3), labels, skipped sources."""
    source = open_source(data)
    items = source.items[:limit] if limit else source.items
    images, labels, skipped = [], [], []
    for item in tqdm(items, desc="load images", unit="img"):
        try:
            images.append(center_crop_adm(decode_image(read_bytes(item, source.image_column)), image_size))
            labels.append(item.label)
        except (ImageDecodeError, OSError) as e:
            skipped.append(f"{item.source}: {e}")
    if not images:
        raise ConfigError(f"no readable images in {data}")
    return np.stack(images), np.array(labels), skipped


def save_reconstruction_grid(vq: VQModel, images: np.ndarray, path: Path, per_row: int = 10) -> None:
    """Originals in the top row, reconstructions below."""
    x = to_model_input(images[:per_row])
    rec = to_uint8_images(vq.decode_codes(vq.encode_codes(x)))
    grid = np.concatenate([np.concatenate(list(images[:per_row]), axis=1), np.concatenate(list(rec), axis=1)], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def fit_vq(plan: FitVQConfig, codebook_size: int = 0) -> dict:
    """Fit the VQ of `npp tokenize fit-vq` (its checked flags); `codebook_size` > 0 overrides the preset's."""
    data, out, preset, image_size, seed = plan.data, plan.out, plan.preset, plan.image_size, plan.seed
    minutes, max_steps, batch, lr = plan.minutes, plan.max_steps, plan.batch, plan.lr
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels, skipped = load_images(data, image_size)
    if skipped:
        print(f"fit-vq: skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    overrides = {"codebook_size": codebook_size} if codebook_size else {}
    cfg = vq_config(preset, **overrides)
    vq = VQModel(cfg).train()
    opt = torch.optim.Adam(vq.parameters(), lr=lr, betas=(0.9, 0.99))
    usage = torch.zeros(cfg.codebook_size)
    start = time.time()
    step, losses = 0, []
    bar = tqdm(total=max_steps, desc="fit-vq", unit="step")
    while step < max_steps and not (minutes and time.time() - start >= minutes * 60):
        idx = rng.integers(0, len(images), batch)
        x = to_model_input(images[idx])
        rec, codes, codebook_loss, commit_loss = vq(x)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + codebook_loss + commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage.mul_(0.95).index_add_(0, codes.flatten(), torch.ones(codes.numel()))
        if step % 50 == 49:
            reseed_dead_codes(vq, x, usage)
        for g in opt.param_groups:  # cosine decay over the step budget
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(step / max_steps, 1.0)))
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", used=int((usage > 0.01).sum()), refresh=False)
    bar.close()
    vq.eval()
    with torch.no_grad():
        sample = images[rng.choice(len(images), min(512, len(images)), replace=False)]
        x = to_model_input(sample)
        rec_mse = F.mse_loss(vq.decode_codes(vq.encode_codes(x)), x).item()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = {"steps": step, "seconds": round(time.time() - start, 1), "recon_mse": rec_mse,
             "codes_used": int((usage > 0.01).sum()), "image_size": image_size}
    torch.save({"model": vq.state_dict(), "config": cfg.to_dict(), "steps": step, "fit": stats}, out_path)
    # one image of each class for the picture, in class order
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in sorted(set(labels.tolist()))][:10]
    png = out_path.with_suffix(".png")
    save_reconstruction_grid(vq, images[firsts], png, per_row=len(firsts))
    print(f"fit-vq: {step} steps in {stats['seconds']} s, reconstruction MSE {rec_mse:.4f} (images in [-1, 1]), "
          f"{stats['codes_used']}/{cfg.codebook_size} codes in use; wrote {out_path} and {png}")
    return stats


@torch.no_grad()
def reseed_dead_codes(vq: VQModel, x: torch.Tensor, usage: torch.Tensor, threshold: float = 0.01) -> int:
    """Move unused codebook entries onto random current encoder outputs (keeps a small codebook alive)."""
    dead = (usage < threshold).nonzero().flatten()
    if len(dead) == 0:
        return 0
    z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, vq.config.codebook_embed_dim)
    pick = z[torch.randint(0, z.shape[0], (len(dead),))]
    vq.quantize.embedding.weight[dead] = F.normalize(pick, dim=-1) if vq.quantize.l2_norm else pick
    usage[dead] = 1.0
    return len(dead)
