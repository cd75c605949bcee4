"""The tokenize stage's typed config, checked before torch is imported.

A wrong flag should fail in a fraction of a second with a line naming it, not after
the 3-10 s it takes to import torch, so this module imports nothing heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from npp.errors import UsageError


@dataclass
class TokenizeConfig:
    data: str  # ImageFolder directory (one folder per class) or parquet file/directory
    vq: str  # VQ tokenizer checkpoint (LlamaGen vq_ds16_c2i.pt, or `npp tokenize fit-vq`)
    out: str  # shard-set directory
    image_size: int = 256
    views: int = 2  # 1: center crop; 2: center crop and its mirror
    ten_crop: bool = False  # ten crops (corners, center, mirrored) per --crop-range
    crop_range: str = "1.1"  # with --ten-crop: enlargement of the center crop; "1.1,1.05" = NPP's 20 views
    samples_per_shard: int = 1000
    batch: int = 64  # views encoded per forward
    workers: int = 4  # image decoding processes
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    num_classes: Optional[int] = None
    seed: int = 0  # seed of the permutation that deals inputs to shards (recorded in meta.json)
    rank: Optional[int] = None
    world_size: Optional[int] = None
    device: str = "auto"

    def validate(self) -> None:
        """Refuse flag values that cannot work, naming the flag and the fix (no torch needed)."""
        from npp.pipeline.images import crop_ranges

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        need(isinstance(self.samples_per_shard, int) and self.samples_per_shard >= 1,
             f"--samples-per-shard must be a whole number >= 1 (got {self.samples_per_shard!r}); 1000 suits ImageNet")
        need(isinstance(self.batch, int) and self.batch >= 1, f"--batch must be >= 1 (got {self.batch!r})")
        need(isinstance(self.workers, int) and self.workers >= 0, f"--workers must be >= 0 (got {self.workers!r})")
        need(isinstance(self.image_size, int) and self.image_size >= 1,
             f"--image-size must be a positive number of pixels (got {self.image_size!r})")
        need(self.ten_crop or self.views in (1, 2), f"--views must be 1 or 2 (or use --ten-crop), got {self.views!r}")
        need(self.num_classes is None or (isinstance(self.num_classes, int) and self.num_classes >= 1),
             f"--num-classes must be a whole number >= 1 (got {self.num_classes!r})")
        try:
            crop_ranges(self.crop_range)
        except ValueError as e:
            raise UsageError(str(e)) from None
        need(bool(self.data) and os.path.exists(self.data),
             f"data path {self.data!r} does not exist: pass --data DIR (ImageFolder) or parquet files")
        need(bool(self.vq) and os.path.isfile(self.vq),
             f"tokenizer checkpoint {self.vq!r} does not exist: pass --vq PATH (LlamaGen's vq_ds16_c2i.pt or a "
             "checkpoint from `npp tokenize fit-vq`)")
        need(bool(self.out), "--out is empty: pass the shard-set directory")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
