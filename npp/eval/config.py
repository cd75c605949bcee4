"""The sample stage's typed config (torch-free, so the CLI can check flags before importing torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from npp.pipeline.eval_spec import EvalSpec
from npp.runtime.flags import documented, flag, need


@documented
@dataclass
class SampleConfig:
    """The flags of `npp sample`."""

    ckpt: str = flag(help="the exported model (RUN/model.pt from `npp train export`, or a LlamaGen/NPP GPT "
                          "checkpoint)")
    vq: str = flag(help="the VQ tokenizer the model was trained on (LlamaGen's vq_ds16_c2i.pt)")
    out: str = flag(help="directory of the samples (.npz per guidance scale, PNG grid); a rerun resumes it")
    per_class: int = flag(50, "samples per class with --labels balanced (FID-50k: 50 x 1000 classes)")
    cfg_scale: float | str = flag(2.0, "classifier-free guidance scale, or several for a sweep: '1.5,2.0,2.5'")
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

    def scales(self) -> list[float]:
        """--cfg-scale as the scales to sample, the one place it is read: one number, or a sweep written `1.5,2.0`
        (or a list in-process). ValueError: a word that is not a number."""
        if isinstance(self.cfg_scale, (list, tuple)):
            return [float(v) for v in self.cfg_scale]
        return [float(v) for v in str(self.cfg_scale).strip("[]() ").split(",") if v.strip()]

    def validate(self) -> None:
        """Refuse flags and inputs that cannot work, before torch is imported."""
        from npp.pipeline.inputs import check_gpt_checkpoint, check_vq_checkpoint

        need(int(self.per_class) >= 1 or self.labels == "random", f"--per-class must be >= 1, got {self.per_class}")
        need(int(self.batch) >= 0, f"--batch must be >= 0 (0 = auto), got {self.batch}")
        need(float(self.temperature) > 0, f"--temperature must be > 0, got {self.temperature}")
        need(int(self.top_k) >= 0 and 0 < float(self.top_p) <= 1, "--top-k must be >= 0 and --top-p in (0, 1]")
        need(self.device in ("auto", "cpu") or str(self.device).startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        try:
            scales = self.scales()
        except ValueError:
            scales = []
        need(bool(scales), f"--cfg-scale {self.cfg_scale!r}: give a number or a comma list such as 1.5,2.0")
        need(bool(self.out), "--out is empty: pass the samples' directory")
        check_gpt_checkpoint(self.ckpt, "--ckpt")
        check_vq_checkpoint(self.vq, "--vq")


@documented
@dataclass
class WatchConfig(EvalSpec):
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
