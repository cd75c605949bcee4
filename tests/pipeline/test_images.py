import io

import numpy as np
import pytest
from PIL import Image

from npp.pipeline.images import ImageDecodeError, center_crop_adm, decode_image, make_views


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.asarray(out)[15, 20, 0] > 150


def test_modes_become_rgb():
    gray = decode_image(encode(Image.new("L", (8, 8), 77), "PNG"))
    assert np.asarray(gray)[0, 0].tolist() == [77, 77, 77]
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(decode_image(encode(pal, "PNG")))[0, 0].tolist() == [10, 200, 30]
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[0, 0, 0] > 200


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(decode_image(encode(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert abs(int(np.asarray(decode_image(encode(half, "PNG")))[0, 0, 0]) - 127) <= 1
    la = Image.new("LA", (8, 8), (0, 0))
    assert np.asarray(decode_image(encode(la, "PNG")))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert np.asarray(decode_image(encode(pal, "PNG", transparency=0)))[0, 0].tolist() == [255, 255, 255]


def test_16_bit_png_scaled_to_8_bit():
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    arr[0, 1] = 32896  # 128 * 257
    img = Image.fromarray(arr)
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    "data, match",
    [(b"", "empty file"), (b"this is not an image", "UnidentifiedImageError"),
     (encode(Image.new("RGB", (64, 64), 5), "JPEG")[:200], "OSError|truncated|broken")],
)
def test_bad_bytes_raise_image_decode_error(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(data)


def test_adm_center_crop_and_views():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    crop = center_crop_adm(img, 64)
    assert crop.shape == (64, 64, 3)
    two = make_views(img, 64, views=2)
    assert two.shape == (2, 64, 64, 3)
    assert np.array_equal(two[1], two[0][:, ::-1])
    ten = make_views(img, 64, ten_crop=True, crop_range=1.1)
    assert ten.shape == (10, 64, 64, 3)
    big = center_crop_adm(img, int(64 * 1.1))
    assert np.array_equal(ten[0], big[:64, :64])  # top-left
    assert np.array_equal(ten[5], big[:, ::-1][:64, :64])  # top-left of the mirror
