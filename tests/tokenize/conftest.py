"""Fixtures for the tokenize stage: a tiny image tree (with broken files) and an untrained small VQ."""

import io

import numpy as np
import pytest
from PIL import Image

from npp.pipeline.toy import write_toy_dataset
from tests.helpers import save_small_vq as save_vq


@pytest.fixture(scope="session")
def toy_tree(tmp_path_factory):
    """3 toy images per class (30), plus one broken or odd file of each kind in class 0."""
    root = tmp_path_factory.mktemp("toy") / "images"
    write_toy_dataset(str(root), per_class=3, size=40)
    odd = root / "00_circle"
    (odd / "zero.png").write_bytes(b"")
    (odd / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="JPEG")
    (odd / "truncated.jpg").write_bytes(buf.getvalue()[:150])
    Image.fromarray(np.full((50, 70), 40000, np.uint16)).save(odd / "deep16.png")
    Image.new("CMYK", (50, 50), (0, 200, 0, 0)).save(odd / "cmyk.jpg")
    Image.new("RGBA", (36, 60), (0, 0, 255, 100)).save(odd / "alpha.png")
    Image.new("P", (40, 40), 3).save(odd / "palette.gif")
    return root


@pytest.fixture(scope="session")
def vq_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "vq.pt"
    save_vq(path)
    return path
