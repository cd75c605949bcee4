"""The tokenize stage's typed config, checked before torch is imported.

A wrong flag should fail in a fraction of a second with a line naming it, not after
the 3-10 s it takes to import torch, so this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from npp.errors import UsageError
from npp.runtime.flags import Checked, documented, flag, need
from npp.runtime.workers import slurm_workers


@documented
@dataclass(frozen=True)
class TokenizeConfig(Checked):
    """The flags of `npp tokenize run`."""

    data: str = flag(help="ImageFolder directory (one folder per class) or parquet file/directory")
    vq: str = flag(help="VQ tokenizer checkpoint (LlamaGen's vq_ds16_c2i.pt, or `npp tokenize "
                        "fit-vq`)")
    out: str = flag(help="shard-set directory; a rerun resumes it")
    image_size: int = flag(256, "pixels of the square crops encoded")
    views: int = flag(2, "1: center crop; 2: center crop and its mirror", choices=(1, 2))
    ten_crop: bool = flag(False, "ten crops (corners, center, mirrored) per --crop-range instead of --views")
    crop_range: str = flag("1.1", "with --ten-crop: enlargement of the center crop; '1.1,1.05' = NPP's 20 views")
    samples_per_shard: int = flag(1000, "images per shard (1000 suits ImageNet)")
    batch: int = flag(64, "views encoded per forward")
    workers: int = flag(-1, "image decoding processes; -1 = auto (SLURM's CPUs - 1, else 4)")
    split: str = flag("train", "the shard files' prefix (train-000000.tar)")
    image_column: str = flag("image", "parquet: the image column")
    label_column: str = flag("label", "parquet: the label column")
    num_classes: int | None = flag(None, "classes (default: those found)")
    seed: int = flag(0, "seed of the permutation that deals inputs to shards (recorded in meta.json)")
    val_share: float = flag(0.0, "share of the inputs held out (a seeded choice, by --seed) in shards of their own "
                                 "(val-NNNNNN.tar, val_manifest.parquet), never trained on: training logs the "
                                 "next-token loss on them (val/loss_k1), comparable across schedules; e.g. 0.01")
    rank: int | None = flag(None, "this task's index (default: SLURM array task, torchrun rank, or 0)")
    world_size: int | None = flag(None, "tasks in all (default: SLURM array size, torchrun world, or 1)")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")

    def validate(self) -> None:
        """Refuse flag values that cannot work, naming the flag and the fix (no torch needed)."""
        from npp.pipeline.images import crop_ranges
        from npp.pipeline.inputs import check_image_source, check_vq_checkpoint

        need(isinstance(self.samples_per_shard, int) and self.samples_per_shard >= 1,
             f"--samples-per-shard must be a whole number >= 1 (got {self.samples_per_shard!r}); 1000 suits ImageNet")
        need(isinstance(self.batch, int) and self.batch >= 1, f"--batch must be >= 1 (got {self.batch!r})")
        need(isinstance(self.workers, int) and self.workers >= -1, f"--workers must be >= 0, or -1 for auto (got "
             f"{self.workers!r})")
        need(isinstance(self.image_size, int) and self.image_size >= 1,
             f"--image-size must be a positive number of pixels (got {self.image_size!r})")
        need(self.ten_crop or self.views in (1, 2), f"--views must be 1 or 2 (or use --ten-crop), got {self.views!r}")
        need(0 <= float(self.val_share) < 1, f"--val-share must lie in [0, 1), got {self.val_share!r}")
        need(not (float(self.val_share) > 0 and self.split == "val"),
             "--split val is the held-out split's own name: pick another --split with --val-share")
        need(self.num_classes is None or (isinstance(self.num_classes, int) and self.num_classes >= 1),
             f"--num-classes must be a whole number >= 1 (got {self.num_classes!r})")
        try:
            crop_ranges(self.crop_range)
        except ValueError as e:
            raise UsageError(str(e)) from None
        check_image_source(self.data)
        check_vq_checkpoint(self.vq, "--vq")
        need(bool(self.out), "--out is empty: pass the shard-set directory")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")


def auto_workers(requested: int) -> int:
    """--workers -1: one per CPU SLURM gives the task, less one for the encoder loop; 4 elsewhere."""
    if requested >= 0:
        return requested
    return slurm_workers() or 4


@documented
@dataclass(frozen=True)
class FinalizeConfig(Checked):
    """The flags of `npp tokenize finalize`."""

    out: str = flag(help="the shard-set directory of the array run")

    def validate(self) -> None:
        from npp.pipeline.shards import is_shard_set

        need(is_shard_set(self.out), f"--out {self.out} is not a shard set (no meta.json): pass the --out of "
                                     "`npp tokenize run`")


@documented
@dataclass(frozen=True)
class ToyConfig(Checked):
    """The flags of `npp tokenize toy`."""

    out: str = flag(help="the ImageFolder root to write")
    per_class: int = flag(200, "images per class")
    size: int = flag(48, "pixels per side")
    seed: int = flag(0, "seed of the drawing")

    def validate(self) -> None:
        need(bool(self.out), "--out is empty: pass the ImageFolder root to write")
        need(self.per_class >= 1, f"--per-class must be at least 1, got {self.per_class}")
        need(self.size >= 16, f"--size must be at least 16 pixels, got {self.size}")


@documented
@dataclass(frozen=True)
class FitVQConfig(Checked):
    """The flags of `npp tokenize fit-vq`."""

    data: str = flag(help="training images: ImageFolder directory or parquet files")
    out: str = flag(help="the checkpoint to write (.pt)")
    preset: str = flag("VQ-toy", "tokenizer size: VQ-toy (small, fits on a CPU), VQ-8 or VQ-16 (LlamaGen's shapes)",
                       choices=("VQ-toy", "VQ-8", "VQ-16"))
    image_size: int = flag(32, "pixels of the training crops")
    max_steps: int = flag(1200, "optimizer steps (the budget)")
    minutes: float = flag(0.0, ">0: also stop after this many minutes (machine-dependent)")
    batch: int = flag(32, "images per step")
    lr: float = flag(3e-3, "learning rate")
    seed: int = flag(0, "seed of weights and data order")

    def validate(self) -> None:
        from npp.pipeline.inputs import check_image_source

        check_image_source(self.data)
        need(bool(self.out), "--out is empty: pass the checkpoint to write (.pt)")
        need(self.image_size >= 8 and self.max_steps >= 1 and self.batch >= 1,
             "--image-size must be at least 8, --max-steps and --batch at least 1")
        need(self.lr > 0 and self.minutes >= 0, "--lr must be > 0 and --minutes >= 0")
