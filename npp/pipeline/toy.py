"""The built-in toy dataset: ten classes of shapes and patterns, rendered deterministically.

Each image is a shape or pattern of a random colour, size and position on a
background of another colour, so a class is defined by its geometry alone and a small
classifier can tell them apart while a generator has to learn it. Written in
ImageFolder layout as PNG, so it goes through exactly the path ImageNet does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from npp.runtime.files import atomic_path

TOY_CLASSES = [
    "circle", "square", "triangle", "cross", "ring",
    "diamond", "hstripes", "vstripes", "checker", "dstripes",
]


# A small palette keeps the dataset learnable on a CPU in minutes: the class is the
# geometry, the colours are a nuisance drawn from PALETTE.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (240, 240, 240), (20, 20, 20),
]


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two different palette colours: background and foreground."""
    bg, fg = rng.choice(len(PALETTE), size=2, replace=False)
    return PALETTE[bg], PALETTE[fg]


def render(cls: int, size: int, rng: np.random.Generator) -> Image.Image:
    bg, fg = _colours(rng)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    name = TOY_CLASSES[cls]
    r = size * rng.uniform(0.22, 0.38)  # half extent of the shape
    cx, cy = (size * rng.uniform(0.38, 0.62) for _ in range(2))
    box = [cx - r, cy - r, cx + r, cy + r]
    width = max(2, int(r * 0.4))
    if name == "circle":
        d.ellipse(box, fill=fg)
    elif name == "square":
        d.rectangle(box, fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "cross":
        d.rectangle([cx - r, cy - width / 2, cx + r, cy + width / 2], fill=fg)
        d.rectangle([cx - width / 2, cy - r, cx + width / 2, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse(box, outline=fg, width=width)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    else:  # full-image patterns with a random period and phase
        period = size * rng.uniform(0.3, 0.45)
        phase = rng.uniform(0, period)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        if name == "hstripes":
            on = ((yy + phase) // (period / 2)) % 2 == 0
        elif name == "vstripes":
            on = ((xx + phase) // (period / 2)) % 2 == 0
        elif name == "checker":
            on = (((yy + phase) // (period / 2)) + ((xx + phase) // (period / 2))) % 2 == 0
        else:  # dstripes
            on = ((xx + yy + phase) / math.sqrt(2) // (period / 2)) % 2 == 0
        arr = np.where(on[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8)).astype(np.uint8)
        img = Image.fromarray(arr)
    return img


def write_toy_dataset(out: str, per_class: int, size: int, seed: int = 0) -> int:
    """Render the toy set into out/<class>/<index>.png; existing files are kept (reruns are cheap)."""
    root = Path(out)
    written = 0
    total = per_class * len(TOY_CLASSES)
    with tqdm(total=total, desc="toy images", unit="img") as bar:
        for cls, name in enumerate(TOY_CLASSES):
            folder = root / f"{cls:02d}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"{name}_{i:05d}.png"
                if not path.exists():
                    rng = np.random.default_rng([seed, cls, i])  # each image has its own stream
                    with atomic_path(path) as tmp:  # hidden until whole: scans skip it
                        render(cls, size, rng).save(tmp, format="PNG")
                    written += 1
                bar.update(1)
    return written
