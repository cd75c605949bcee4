"""The sample stage's typed config (torch-free, so the CLI can check flags before importing torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from npp.errors import UsageError
from npp.pipeline.eval_spec import EvalSpec
from npp.runtime.flags import Checked, Numbers, documented, flag, need, numbers
from npp.runtime.mlflow_utils import EXPERIMENT


@documented
@dataclass(frozen=True)
class SampleConfig(Checked):
    """The flags of `npp sample`."""

    ckpt: str = flag(help="the exported model (RUN/model.pt from `npp train export`, or a LlamaGen/NPP GPT "
                          "checkpoint)")
    vq: str = flag(help="the VQ tokenizer the model was trained on (LlamaGen's vq_ds16_c2i.pt)")
    out: str = flag(help="directory of the samples (.npz per guidance scale, PNG grid); a rerun resumes it")
    per_class: int = flag(50, "samples per class with --labels balanced (FID-50k: 50 x 1000 classes)")
    cfg_scale: Numbers = flag((2.0,), "classifier-free guidance scale, or several for a sweep: 1.5,2.0,2.5")
    batch: int = flag(0, "samples per piece; 0 = the largest the free GPU memory holds (at most 256), 64 on CPU")
    temperature: float = flag(1.0, "sampling temperature")
    top_k: int = flag(0, "sample from the k most likely tokens (0 = all)")
    top_p: float = flag(1.0, "nucleus sampling mass (1 = all)")
    cfg_interval: int = flag(-1, "guide only the first N + 2 tokens, as LlamaGen's sampler counts N (-1 = all)")
    seed: int = flag(0, "sample j has seed seed*1000003 + j: the same images for any batch or number of ranks")
    labels: str = flag("balanced", "balanced: --per-class of every class; random: --num-samples uniform labels",
                       choices=("balanced", "random"))
    num_samples: int = flag(0, "samples with --labels random (default per_class x classes)")
    ema: bool = flag(False, "sample with the EMA weights when the checkpoint has them")
    grid_classes: int = flag(16, "rows (classes) of the PNG grid")
    grid_per_class: int = flag(8, "columns (samples per class) of the PNG grid")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    precision: str = flag("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, or bf16 (weights and KV cache in bf16; "
                                  "logits and sampling in fp32)", choices=("auto", "fp32", "bf16"))
    compile: str = flag("auto", "the token step compiled and captured as a CUDA graph: auto = on CUDA; off = eager",
                        choices=("auto", "on", "off"))

    def __post_init__(self):  # in-process callers may give one number or text: the same value type as the flag's
        try:
            object.__setattr__(self, "cfg_scale", numbers(self.cfg_scale))
        except ValueError:
            raise UsageError(f"--cfg-scale {self.cfg_scale!r}: give a number or a comma list such as 1.5,2.0") from None

    def validate(self) -> None:
        """Refuse flags and inputs that cannot work, before torch is imported."""
        from npp.pipeline.inputs import check_gpt_checkpoint, check_vq_checkpoint

        need(int(self.per_class) >= 1 or self.labels == "random", f"--per-class must be >= 1, got {self.per_class}")
        need(int(self.batch) >= 0, f"--batch must be >= 0 (0 = auto), got {self.batch}")
        need(float(self.temperature) > 0, f"--temperature must be > 0, got {self.temperature}")
        need(int(self.top_k) >= 0 and 0 < float(self.top_p) <= 1, "--top-k must be >= 0 and --top-p in (0, 1]")
        need(self.device in ("auto", "cpu") or str(self.device).startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        need(bool(self.out), "--out is empty: pass the samples' directory")
        check_gpt_checkpoint(self.ckpt, "--ckpt")
        check_vq_checkpoint(self.vq, "--vq")


@documented
@dataclass(frozen=True)
class WatchConfig(EvalSpec, Checked):
    """`npp eval watch`: the evaluation of `npp train --eval-every` (EvalSpec's flags, unprefixed) on each new
    complete checkpoint of a run, outside the training job."""

    run: str = flag("", "the training run folder (npp train --out)")
    ema: bool = flag(True, "evaluate the EMA weights when a checkpoint has them")
    interval: float = flag(300.0, "seconds between looks for new checkpoints")
    once: bool = flag(False, "evaluate what is there now, then stop")

    def validate(self) -> None:
        need(bool(self.run), "npp eval watch needs --run RUN (the training run's folder)")
        need(os.path.isdir(self.run) and os.path.exists(os.path.join(self.run, "config.json")),
             f"--run {self.run} is not a training run folder (no config.json): pass npp train's --out")
        super().validate()


REFERENCE_IMAGES = 50_000  # real images a reference holds (ADM's reference batches hold 50,000)
PR_FEATURES = 10_000  # features kept for precision/recall


@documented
@dataclass(frozen=True)
class EvalConfig(Checked):
    """The flags of `npp eval`."""

    samples: str = flag(help="samples .npz (from npp sample): a file, a comma list or a glob")
    ref: str = flag(help="reference batch (ADM's VIRTUAL_imagenet256_labeled.npz) or statistics from `npp eval ref`")
    run_id: str = flag("", "the MLflow run to log into (default: the run of --ckpt)")
    ckpt: str = flag("", "the model the samples came from (finds its training run)")
    inception: str = flag("", "FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    classifier: str = flag("", "or a toy classifier (npp eval fit-classifier) as the feature network")
    experiment: str = flag(EXPERIMENT, "MLflow experiment")
    log: bool = flag(True, "log the metrics to MLflow (--nolog: print only)")

    def validate(self) -> None:
        from npp.pipeline.inputs import check_file, check_gpt_checkpoint, check_samples

        check_samples(self.samples)
        check_file(self.ref, "--ref", "a reference batch or statistics (.npz)", "ADM's VIRTUAL_imagenet256_labeled.npz "
                   "(`make assets` downloads it into ckpts/), or `npp eval ref` writes statistics")
        if self.ckpt:
            check_gpt_checkpoint(self.ckpt)
        if self.inception:
            check_file(self.inception, "--inception", "the FID Inception weights",
                       "`make assets` downloads pt_inception-2015-12-05-6726825d.pth into ckpts/")


@documented
@dataclass(frozen=True)
class RefConfig(Checked):
    """The flags of `npp eval ref`."""

    out: str = flag(help="the statistics file to write (.npz)")
    data: str = flag("", "real images (ImageFolder or parquet)")
    shards: str = flag("", "or the shard set whose source images to use")
    image_size: int = flag(0, "pixels (default: the shard set's)")
    inception: str = flag("", "FID Inception weights")
    classifier: str = flag("", "or a toy classifier as the feature network")
    limit: int = flag(REFERENCE_IMAGES, "images used (0 = all)")
    max_features: int = flag(PR_FEATURES, "features kept for precision/recall")

    def validate(self) -> None:
        need(bool(self.data or self.shards), "npp eval ref needs --data IMAGES or --shards SET (a shard set, whose "
                                            "source images are used)")
        need(bool(self.shards or self.image_size), "--data needs --image-size (the size samples are generated at)")
        need(bool(self.out), "--out is empty: pass the statistics file to write (.npz)")
        need(self.limit >= 0 and self.max_features >= 1 and self.image_size >= 0,
             "--limit and --image-size must be >= 0, --max-features at least 1")


@documented
@dataclass(frozen=True)
class FitClassifierConfig(Checked):
    """The flags of `npp eval fit-classifier`."""

    data: str = flag(help="labelled images: ImageFolder directory or parquet files")
    out: str = flag(help="the classifier checkpoint to write")
    image_size: int = flag(32, "pixels")
    epochs: int = flag(6, "passes over the data")
    batch: int = flag(64, "images per step")
    lr: float = flag(2e-3, "learning rate")
    seed: int = flag(0, "seed of weights and data order")

    def validate(self) -> None:
        from npp.pipeline.inputs import check_image_source

        check_image_source(self.data)
        need(bool(self.out), "--out is empty: pass the classifier checkpoint to write")
        need(self.image_size >= 8 and self.epochs >= 1 and self.batch >= 1 and self.lr > 0,
             "--image-size must be at least 8, --epochs and --batch at least 1, --lr > 0")


@documented
@dataclass(frozen=True)
class CompareConfig(Checked):
    """The flags of `npp compare`."""

    experiment: str = flag(EXPERIMENT, "MLflow experiment of the runs")
    out: str = flag("compare", "directory of the table, the figure and comparison.json")
    metric: str = flag("", "the FID to compare, as npp or the MLflow UI names it (fid, curve/fid_n200 or "
                           "Results/fid_n200; default: the one with the most annealed ends)")
    runs: str = flag("", "the runs to compare, comma-separated names or ids (default: every training run of the "
                         "experiment)")

    def run_list(self) -> list[str] | None:
        return [r.strip() for r in self.runs.split(",") if r.strip()] or None

    def validate(self) -> None:
        need(bool(self.experiment) and bool(self.out), "--experiment and --out must not be empty")
