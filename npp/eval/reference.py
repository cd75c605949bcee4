"""Reference statistics: from real images (`npp eval ref`) or an ADM reference batch.

Our reference `.npz` holds, per feature network: `mu`, `sigma` (pool features),
`mu_s`, `sigma_s` (spatial features, sFID), `features` (pool features for
precision/recall, at most `max_features` of them), and `net`, `image_size`,
`count`, `weights_sha256`. An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)
has `arr_0` images and the same four statistics; its features are computed from `arr_0`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from npp.errors import NppError
from npp.eval.config import PR_FEATURES, REFERENCE_IMAGES
from npp.eval.features import extract
from npp.eval.metrics import gaussian_stats
from npp.pipeline.images import ImageDecodeError, center_crop_adm, decode_image
from npp.pipeline.shards import read_meta, source_path
from npp.pipeline.sources import open_source, read_bytes
from npp.runtime.files import atomic_path


class EvalInputError(NppError, ValueError):
    """A reference, samples file or feature network that cannot be used as given; names the file and the fix."""


def load_npz(path: str, role: str) -> dict:
    """An .npz as a dict, with errors that name the file and the fix."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{role} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise EvalInputError(f"{role} file {path} is not a readable .npz ({e}): regenerate it") from None


def _reference_items(data: str | None, shards: str | None, image_size: int | None, limit: int):
    if shards:
        meta = read_meta(shards)
        data = source_path(meta)
        image_size = image_size or meta["image_size"]
    if not data:
        raise EvalInputError("give --data DIR (images) or --shards DIR (a shard set, whose source images are used)")
    if not image_size:
        raise EvalInputError("give --image-size (the size samples are generated at)")
    source = open_source(data)
    items = source.items
    if limit and len(items) > limit:  # a seeded, class-blind subset (ADM's reference batches hold 50,000)
        idx = np.random.default_rng(0).choice(len(items), limit, replace=False)
        items = [items[i] for i in sorted(idx)]
    return source, items, int(image_size), data


def iter_real_images(data: str | None, shards: str | None, image_size: int | None, limit: int = REFERENCE_IMAGES,
                     batch: int = 256):
    """(batches of uint8 (n, S, S, 3) cropped as tokenize crops them, source path): never all images at once."""
    source, items, size, data = _reference_items(data, shards, image_size, limit)

    def batches():
        buf = []
        for item in tqdm(items, desc="reference images", unit="img"):
            try:
                buf.append(center_crop_adm(decode_image(read_bytes(item, source.image_column)), size))
            except (ImageDecodeError, OSError):
                continue
            if len(buf) == batch:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    return batches(), data


def real_images(data: str | None, shards: str | None, image_size: int | None, limit: int = 0) -> tuple[np.ndarray, str]:
    """Real images cropped as tokenize crops them, as one array (small sets: the demo, the toy classifier)."""
    batches, data = iter_real_images(data, shards, image_size, limit)
    images = list(batches)
    if not images:
        raise EvalInputError(f"no readable images in {data}")
    return np.concatenate(images), data


def make_reference(net, images, out: str, max_features: int = PR_FEATURES, source: str = "") -> dict:
    """Statistics of real images: one uint8 array, or an iterable of batches (streamed through the network)."""
    if isinstance(images, np.ndarray):
        images = [images]
    pool, spatial, count, size = [], [], 0, 0
    for chunk in images:
        feats = extract(net, chunk, desc="reference features")
        pool.append(feats["pool"].astype(np.float32))
        spatial.append(feats["spatial"].astype(np.float32))
        count, size = count + len(chunk), chunk.shape[1]
    if not count:
        raise EvalInputError(f"no readable images for the reference {out}")
    pool_f, spatial_f = np.concatenate(pool), np.concatenate(spatial)
    mu, sigma = gaussian_stats(pool_f.astype(np.float64))
    mu_s, sigma_s = gaussian_stats(spatial_f.astype(np.float64))
    keep = pool_f
    if len(keep) > max_features:
        keep = keep[np.random.default_rng(0).choice(len(keep), max_features, replace=False)]
    ref = {
        "net": np.array(net.name), "image_size": np.array(size), "count": np.array(count),
        "weights_sha256": np.array(getattr(net, "weights_sha256", "")), "source": np.array(source),
        "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "features": keep.astype(np.float32),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **ref)
    print(f"reference {out}: {count} images at {size}px through {net.name}")
    return ref


def reference_for(net, path: str) -> dict:
    """mu/sigma/mu_s/sigma_s/features and image_size of a reference, checked against the feature network."""
    ref = load_npz(path, "reference")
    if "net" in ref:
        if str(ref["net"]) != net.name:
            raise EvalInputError(
                f"reference {path} was made with the {ref['net']} network but the samples are evaluated with "
                f"{net.name}: make a reference with the same network (`npp eval ref ...`)"
            )
        return {**ref, "image_size": int(ref["image_size"])}
    if "arr_0" not in ref:
        raise EvalInputError(f"reference {path} has neither our statistics nor ADM's arr_0 images")
    if net.name != "inception":
        raise EvalInputError(f"{path} is an ADM (Inception) reference batch; it cannot be used with {net.name}")
    images = ref["arr_0"]
    feats = extract(net, images, desc="reference batch features")
    out = {"image_size": int(images.shape[1]), "features": feats["pool"]}
    for stat, feat in (("mu", "pool"), ("mu_s", "spatial")):
        sig = "sigma" if stat == "mu" else "sigma_s"
        if stat in ref and sig in ref:
            out[stat], out[sig] = ref[stat], ref[sig]
        else:
            out[stat], out[sig] = gaussian_stats(feats[feat])
    return out
