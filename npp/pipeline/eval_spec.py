"""What an evaluation of a model in training samples and measures: one set of names for `npp train --eval-*`
and `npp eval watch` (torch-free: flags are checked before torch is imported).

`npp eval watch` takes these names as they are (`--ref`, `--cfg-scale`, `--per-class` ...); `npp train` takes
them with an `eval-` prefix (`--eval-ref`, `--eval-cfg-scale`, `--eval-per-class` ...), except the three files
that are the run's own (`--vq`, `--inception`, `--classifier`): its flags are these fields, declared here once
(npp.runtime.flags.flag_of). The train stage builds one with `TrainConfig.eval_spec()`, the eval stage evaluates it
(npp.eval.during_training); neither imports the other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from npp.errors import UsageError
from npp.runtime.flags import documented, flag

# `npp train` spells these without its `eval-` prefix: they are the run's own files (its tokenizer, its feature net).
RUN_FILES = ("vq", "inception", "classifier")


@documented
@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation samples and measures."""

    vq: str = flag("", "the tokenizer the shards were made with (decodes the samples)")
    ref: str = flag("", "reference statistics (.npz from `npp eval ref`, or ADM's batch with --inception)")
    inception: str = flag("", "FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    classifier: str = flag("", "or a toy classifier (`npp eval fit-classifier`) as the feature network")
    per_class: int = flag(10, "samples per class (fixed labels and seeds at every evaluation)")
    cfg_scale: float = flag(2.0, "classifier-free guidance scale")
    temperature: float = flag(1.0, "sampling temperature")
    top_k: int = flag(0, "top-k sampling (0 = all tokens)")
    batch: int = flag(64, "samples per sampling batch")
    seed: int = flag(0, "sample j has seed seed*1000003 + j")

    def validate(self, prefix: str = "") -> None:
        """The inputs exist; `prefix` is how the command spells the flags (`eval-` for npp train)."""
        def flag(name: str) -> str:
            own = name in RUN_FILES
            return "--" + ("" if own else prefix) + name.replace("_", "-")

        if not (self.vq and self.ref and (self.inception or self.classifier)):
            raise UsageError(f"evaluating needs {flag('vq')} (the run's tokenizer), {flag('ref')} REF.npz and a "
                             f"feature network ({flag('inception')} PATH or {flag('classifier')} toynet.pt)")
        for name in ("vq", "ref", "inception", "classifier"):
            path = getattr(self, name)
            if path and not os.path.exists(path):
                raise UsageError(f"{flag(name)} {path} does not exist" + (
                    ": `make assets` downloads LlamaGen's tokenizer, ADM's reference batch and the Inception weights "
                    "into ckpts/" if name != "classifier" else ": `npp eval fit-classifier` makes one"))
        if int(self.per_class) < 1 or int(self.batch) < 1:
            raise UsageError(f"{flag('per_class')} and {flag('batch')} must be at least 1")


# --- the protocol of a FID: what makes two FIDs comparable ------------------------------------------------------
# Every FID is logged with the settings that change it (not the sampling seed: another seed is sampling noise, the
# same protocol): as the training run's tag `npp.protocol.<metric>` (JSON), and as params of `npp eval`'s nested
# run. `npp compare` compares only FIDs whose protocols are equal and names what differs otherwise.
PROTOCOL_TAG = "npp.protocol."


def protocol_tags(protocol: dict | None, metrics) -> dict[str, str]:
    """The protocol as the tag beside each FID among `metrics` (their names, npp's own: `npp compare` matches
    FIDs by these tags); none without a protocol."""
    if not protocol:
        return {}
    value = json.dumps(protocol, sort_keys=True)
    return {PROTOCOL_TAG + k: value for k in metrics if "fid" in k}
PROTOCOL_FIELDS = ("per_class", "labels", "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p",
                   "reference_sha256", "feature_net", "feature_net_sha256")


def fid_protocol(per_class: int, cfg_scale: float, temperature: float, top_k: int, reference_sha256: str,
                 feature_net: str, feature_net_sha256: str = "", top_p: float = 1.0, cfg_interval: int = -1,
                 labels: str = "balanced") -> dict:
    """The settings a FID depends on, normalised (numbers as numbers) so equal protocols compare equal."""
    return {"per_class": int(per_class), "labels": str(labels), "cfg_scale": float(cfg_scale),
            "cfg_interval": int(cfg_interval), "temperature": float(temperature), "top_k": int(top_k),
            "top_p": float(top_p), "reference_sha256": str(reference_sha256), "feature_net": str(feature_net),
            "feature_net_sha256": str(feature_net_sha256)}


def protocol_differences(a: dict | None, b: dict | None) -> list[str]:
    """What differs between two protocols, one phrase per setting ('per_class 50 vs 100'); a missing protocol (a
    FID logged by an older npp) is a difference of its own."""
    if a is None or b is None:
        return [] if a is None and b is None else ["protocol not recorded for one of them"]
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in PROTOCOL_FIELDS if a.get(k) != b.get(k)]
