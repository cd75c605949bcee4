"""FID while training: the evaluation the trainer calls at its eval points (built here, handed over by cli.py).

So the training run in MLflow holds FID (and IS, precision/recall, class accuracy with
a classifier) as a curve against cumulative training FLOPs, and NPP and NTP runs
compare like with like: every eval point samples the same class-balanced labels with
the same seeds (sample j uses seed `seed·1000003 + j`, as `npp sample` does), in every
run, on any number of ranks. Ranks sample the pieces p % world == rank through a
`Sampler`, decode in chunks, extract features locally, and rank 0 gathers them and
computes the metrics against the reference. An eager sampler (CPU, compile off) is
freed after each eval point, so its KV caches do not sit beside the training
activations; a graph-captured one (CUDA) is kept, since its graph holds its caches'
addresses (see `_sampler`), and samples a bf16 copy of the weights (`SamplingCopy`), as
`npp sample` does by default, so those caches are half the size they were in fp32. The train stage only sees a callable
`(model, num_classes, device, rank, world) -> metrics` and does not import this stage.

The metrics are named `curve/<metric>_n<samples>` (`curve/fid_toynet_n200`; its cost
`diag/eval_seconds`): a curve's points all come from the same small fixed sample set, while
`npp eval` on a final checkpoint (usually 50,000 samples) logs plain `fid`; FID depends on
the sample count, so the two must not share a series, and MLflow's UI, which groups
`curve/` and titles each chart by the name after it, must not show two charts both titled
`fid_toynet`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from npp.eval.evaluate import metrics_from_features
from npp.eval.features import extract, load_feature_net
from npp.eval.pieces import balanced_labels, pieces_of_rank
from npp.eval.reference import reference_for
from npp.eval.sample import DECODE_CHUNK
from npp.models.checkpoint import load_vq
from npp.models.generate import Sampler, guides
from npp.models.gpt import GPT
from npp.pipeline.eval_spec import EvalSpec, fid_protocol
from npp.pipeline.images import to_uint8_images
from npp.runtime import settings
from npp.runtime.files import file_sha256
from npp.runtime.metric_names import CURVE, DIAG


class SamplingCopy:
    """The model to sample at an eval point in the sampling precision `npp sample` defaults to (bf16 on CUDA, so
    the curve's FID and the final one sample alike, and the sampler's KV cache is half the bytes: GPT-XXL batch 64
    with guidance 9.7 GB instead of 19.3), made once and refreshed from the trained (or EMA) weights at each point;
    the same object every time, so a graph-captured sampler over it is kept. fp32 (CPU): the model itself."""

    def __init__(self, precision: str = "auto"):
        self.precision = precision
        self.copy: torch.nn.Module | None = None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        bf16 = settings.precision(self.precision, device.type == "cuda", training=False) == "bf16"
        if not bf16 or next(model.parameters()).dtype == torch.bfloat16:
            return model
        if self.copy is None or self.copy.config != model.config:
            self.copy = GPT(model.config).to(device=device, dtype=torch.bfloat16).eval()
        self.copy.load_state_dict(model.state_dict())  # cast to bf16 as it is copied
        return self.copy


class TrainingEvaluator:
    def __init__(self, spec: EvalSpec, compile: bool | None = None, precision: str = "auto"):
        """`spec`: what to sample and measure, checked by the caller's plan (npp.train.plan, WatchConfig.validate);
        `compile`: the sampler's graph-captured step (None: on CUDA); `precision`: of the sampling (SamplingCopy)."""
        self.spec = spec
        self.sampling_copy = SamplingCopy(precision)
        self.vq, _ = load_vq(spec.vq)
        self.net = load_feature_net(spec.inception or None, spec.classifier or None)
        self.ref = reference_for(self.net, spec.ref)
        self.compile = compile
        # what every FID of the curve depends on (npp.pipeline.eval_spec); the trainer tags it beside the FID
        self.protocol = fid_protocol(spec.per_class, spec.cfg_scale, spec.temperature, spec.top_k,
                                     file_sha256(spec.ref), self.net.name, getattr(self.net, "weights_sha256", ""))
        self._kept: Sampler | None = None

    def _sampler(self, model: torch.nn.Module, device: torch.device) -> Sampler:
        """A graph-captured sampler is kept from one eval point to the next (its graph reads and writes its caches
        at fixed addresses: new caches would mean a new capture, and a new compile of the step, at every point);
        an eager one is made per point and freed after it."""
        kept = self._kept
        if kept is not None and kept.model is model:
            return kept
        spec = self.spec
        sampler = Sampler(model, spec.batch, guides(spec.cfg_scale), spec.temperature, spec.top_k, compile=self.compile)
        self._kept = sampler
        return sampler

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, num_classes: int, device: torch.device, rank: int, world: int) -> dict:
        t0 = time.time()
        spec = self.spec
        labels = balanced_labels(num_classes, spec.per_class)
        vq = self.vq.to(device)
        mine: dict[int, dict] = {}
        sampler = self._sampler(self.sampling_copy(model, device), device)
        for p, ids in pieces_of_rank(len(labels), spec.batch, rank, world):
            lab = torch.from_numpy(labels[ids]).to(device)
            codes = sampler.generate(lab, cfg_scale=spec.cfg_scale, seed=spec.seed, sample_ids=ids)
            images = to_uint8_images(vq.decode_in_chunks(codes, DECODE_CHUNK).float())
            mine[p] = extract(self.net, images, device=device, desc=f"eval features piece {p}", progress=False)
        if not sampler.compiled:
            self._kept = None  # its KV caches (GPT-XXL, batch 64 with guidance: 19 GB in fp32) are not held
        del sampler
        self.vq.to("cpu")  # nor the tokenizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gathered = _gather(mine, world)
        if rank != 0:
            return {}
        order = sorted(gathered)
        feats = {k: np.concatenate([gathered[p][k] for p in order]) for k in ("pool", "spatial", "logits")}
        metrics = {curve_key(k, len(labels)): v for k, v in metrics_from_features(self.net, feats, self.ref,
                                                                                   labels).items()}
        # what the evaluation cost and how many samples it had: diagnostics, not results (MLflow's UI lists them
        # under `diag/`, after the results)
        metrics.update({f"{DIAG}eval_seconds": time.time() - t0, f"{DIAG}eval_samples": float(len(labels))})
        return metrics



def curve_key(metric: str, samples: int) -> str:
    """An eval point's name for `metric` measured on `samples` samples (see the module's docstring)."""
    return f"{CURVE}{metric}_n{samples}"


def _gather(mine: dict, world: int) -> dict:
    if world == 1 or not torch.distributed.is_initialized():
        return mine
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    out: dict = {}
    for part in parts:
        out.update(part)
    return out
