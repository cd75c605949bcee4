"""Image decoding and the crops LlamaGen extracts codes from (PIL + numpy, no torchvision).

Every input mode becomes 8-bit RGB: palette and grayscale are expanded, CMYK
converted, alpha composited on white, 16-bit samples scaled down. Crops follow
ADM's center crop (box-halve while the short side is ≥ 2× the target, bicubic
resize of the short side, center crop), then either the image and its mirror
(`views=2`) or ten crops (four corners and center, and the same of the mirror)
from a center crop enlarged by `crop_range`; NPP's recipe stores the ten crops of
two ranges (1.1 and 1.05), 20 views, and training picks one at random.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from npp.errors import ConfigError

# A decompression bomb is bad input, not a reason to stop a run: PIL raises, we record it.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, transparency composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16).astype(np.float64)
        peak = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * 255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "L" and "transparency" in img.info:
        return to_rgb(img.convert("LA"))
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Bytes of a JPEG/PNG/WebP/BMP/GIF/... → RGB image; ImageDecodeError for anything unreadable."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: truncated files fail here, not later
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ImageDecodeError(deterministic_reason(f"{type(e).__name__}: {e}")) from None


def deterministic_reason(text: str) -> str:
    """An error message without object addresses (`<_io.BytesIO object at 0x7f..>`), so identical runs
    write identical failure records."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", text)


CropRange = float | Sequence[float]


def crop_ranges(crop_range: CropRange) -> list[float]:
    """`1.1`, `(1.1, 1.05)` or `"1.1,1.05"` as a list of enlargement factors (each >= 1)."""
    if isinstance(crop_range, str):
        parts = [p for p in crop_range.replace(" ", "").strip("()[]").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--crop-range {crop_range!r} is not a number or a comma list like 1.1,1.05") from None
    elif isinstance(crop_range, (int, float)):
        values = [float(crop_range)]
    else:
        values = [float(v) for v in crop_range]
    if not values or any(v < 1.0 for v in values):
        raise ConfigError(f"--crop-range {crop_range!r}: each range must be >= 1 (1.1 enlarges the center crop by 10%)")
    return values


def center_crop_adm(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop to size×size (uint8 HWC)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def five_crops(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right, center (torchvision's FiveCrop order)."""
    h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [
        arr[:size, :size],
        arr[:size, w - size :],
        arr[h - size :, :size],
        arr[h - size :, w - size :],
        arr[top : top + size, left : left + size],
    ]


TEN_CROP_ORDER = ["tl", "tr", "bl", "br", "center", "flip-tl", "flip-tr", "flip-bl", "flip-br", "flip-center"]


def make_views(
    img: Image.Image, size: int, views: int = 2, ten_crop: bool = False, crop_range: CropRange = 1.1
) -> np.ndarray:
    """The crops of one image as uint8 (views, size, size, 3).

    views=1: ADM center crop; views=2: that crop and its mirror; ten_crop: for each
    crop range r in turn, ten crops of an ADM center crop of int(size·r), mirrors last.
    """
    if ten_crop:
        crops = []
        for r in crop_ranges(crop_range):
            big = center_crop_adm(img, int(size * r))
            crops += five_crops(big, size) + five_crops(big[:, ::-1], size)
    else:
        base = center_crop_adm(img, size)
        crops = [base, base[:, ::-1]][:views]
    return np.ascontiguousarray(np.stack(crops))


def describe_views(views: int, ten_crop: bool, crop_range: CropRange) -> dict:
    """How the views were made, for meta.json."""
    if ten_crop:
        ranges = crop_ranges(crop_range)
        return {
            "views": 10 * len(ranges),
            "method": f"ten-crop of an ADM center crop enlarged by crop_range={','.join(f'{r:g}' for r in ranges)}",
            "crop_ranges": ranges,
            "order": [f"{r:g}:{name}" for r in ranges for name in TEN_CROP_ORDER]
            if len(ranges) > 1
            else TEN_CROP_ORDER,
        }
    return {"views": views, "method": "ADM center crop", "order": ["center", "flip-center"][:views]}


def to_model_input(views: np.ndarray):
    """uint8 (N, H, W, 3) → float tensor in [-1, 1] (N, 3, H, W)."""
    import torch

    x = torch.from_numpy(views).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8_images(x) -> np.ndarray:
    """Float tensor in [-1, 1] (N, 3, H, W) → uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
