"""The released class-conditional 256-px GPTs and the FIDs their authors published, with the sampling settings that
gave them: what `npp reproduce` samples and evaluates (torch-free: the CLI lists and checks it before any import).

Sources (read 2026-12-06; each value below names where it came from):
- LlamaGen (NTP): README.md's "AR models" table (FID at 256x256, weights on huggingface.co/FoundationVision/
  LlamaGen), GETTING_STARTED.md's sampling commands (`--cfg-scale 2.0` for GPT-B and GPT-L, written there for the
  384-px runs; the README row of the 256-px checkpoints gives no scale of its own), and
  autoregressive/sample/sample_c2i_ddp.py's defaults (top-k 0, top-p 1.0, temperature 1.0, cfg-interval -1 =
  every token, bf16, 50,000 samples, labels drawn uniformly at random per sample, global seed 0,
  image-size-eval 256), evaluated with ADM's evaluator against VIRTUAL_imagenet256_labeled.npz.
- Next Patch Prediction: README.md's "AR models" table of github.com/PKU-YuanGroup/Next-Patch-Prediction (FID at
  256x256 and the scale in each row's name: B 2.0, L 1.75, XL 1.70, XXL 1.65; weights on huggingface.co/pytttttt/
  LlamaGen-NPP) and its autoregressive/sample/sample_c2i_ddp.py, whose defaults are LlamaGen's above.
LlamaGen's XL, XXL and 3B were released at 384 px only (24x24 tokens): not in this table (npp trains 16x16 grids).
Neither README publishes IS, precision or recall for these rows: npp prints them measured, beside nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from npp.errors import UsageError

# The published protocol both releases share (sample_c2i_ddp.py's defaults, see above).
LLAMAGEN_PROTOCOL = {"labels": "random", "num_samples": 50_000, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "cfg_interval": -1, "precision": "bf16", "image_size": 256}


@dataclass(frozen=True)
class Release:
    """One released checkpoint: the asset `npp assets` fetches, and the published FID with its settings."""

    name: str  # e.g. npp-GPT-B
    model: str  # npp's size name
    schedule: str  # "ntp" (LlamaGen) or "npp"
    asset: str  # its name in npp.pipeline.assets (the file under --assets)
    cfg_scale: float
    fid: float
    source: str  # where the FID and the scale were published
    settings: dict = field(default_factory=lambda: dict(LLAMAGEN_PROTOCOL))

    def sampling(self) -> dict:
        """Every setting a FID of this release depends on, as npp's sample flags name them."""
        return {"cfg_scale": self.cfg_scale, **self.settings}


LLAMAGEN = "FoundationVision/LlamaGen README.md (FID) + GETTING_STARTED.md (--cfg-scale)"
NPP = "PKU-YuanGroup/Next-Patch-Prediction README.md (FID and cfg per row)"

RELEASES = {
    r.name: r
    for r in (
        Release("ntp-GPT-B", "GPT-B", "ntp", "llamagen_c2i_B_256.pt", 2.0, 5.46, LLAMAGEN),
        Release("ntp-GPT-L", "GPT-L", "ntp", "llamagen_c2i_L_256.pt", 2.0, 3.80, LLAMAGEN),
        Release("npp-GPT-B", "GPT-B", "npp", "npp_c2i_B_256.pt", 2.0, 4.47, NPP),
        Release("npp-GPT-L", "GPT-L", "npp", "npp_c2i_L_256.pt", 1.75, 2.76, NPP),
        Release("npp-GPT-XL", "GPT-XL", "npp", "npp_c2i_XL_256.pt", 1.70, 2.65, NPP),
        Release("npp-GPT-XXL", "GPT-XXL", "npp", "npp_c2i_XXL_256.pt", 1.65, 2.55, NPP),
    )
}

# How far a measured FID may sit from the published one before it is flagged. Derived from the sampling noise
# measured on the toy set (bench/fid_noise.py on demo-compare's GPT-Nano NPP model, 2026-12-06, CPU): three sampling
# seeds of 1,000 samples gave FIDs 57.13, 53.98, 56.91, a min-max spread of 3.15 at a mean of 56.0, i.e. 5.6% of the
# FID. A FID's sampling spread shrinks as 1/sqrt(samples), so at N samples it is taken as
# fid x 0.056 x sqrt(1000 / N) (computed, not measured on ImageNet: 0.03 FID at GPT-B's 5.46 and 50,000 samples).
# Below 0.1 FID npp does not flag: GPU kernels in bf16 change the last bits of every sample (npp sample's record
# says so), and their effect on a FID-50k is not measured here; 0.1 is a stated floor, not a measurement.
TOY_RELATIVE_SPREAD = 3.15 / 56.0
TOY_SAMPLES = 1000
TOLERANCE_FLOOR = 0.1


def tolerance(published_fid: float, samples: int) -> float:
    """The flag threshold for a FID of `samples` samples (see the constants above)."""
    return max(TOLERANCE_FLOOR, published_fid * TOY_RELATIVE_SPREAD * (TOY_SAMPLES / max(int(samples), 1)) ** 0.5)


def release_key(model: str, schedule: str) -> str:
    return f"{str(schedule).lower()}-{model}"


def load_table(path: str = "") -> dict[str, Release]:
    """The built-in table, or a JSON file of entries `{name: {model, schedule, asset, cfg_scale, fid, source,
    settings?}}` (a release npp does not list, or a test's stand-in); an entry's settings default to LlamaGen's."""
    if not path:
        return dict(RELEASES)
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--table {path} cannot be read as JSON ({e}): write {{NAME: {{model, schedule, asset, "
                         "cfg_scale, fid, source}} as in npp/eval/published.py") from None
    table = {}
    for name, e in entries.items():
        try:
            r = Release(name=name, model=e["model"], schedule=e["schedule"], asset=e["asset"],
                        cfg_scale=float(e["cfg_scale"]), fid=float(e["fid"]), source=str(e["source"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"--table {path}: entry {name!r} lacks or mistypes {err}: each entry needs model, "
                             "schedule, asset, cfg_scale, fid and source") from None
        table[name] = replace(r, settings={**LLAMAGEN_PROTOCOL, **e.get("settings", {})})
    return table


def find_release(table: dict[str, Release], model: str, schedule: str) -> Release:
    key = release_key(model, schedule)
    for r in table.values():
        if r.model == model and r.schedule == str(schedule).lower():
            return r
    known = ", ".join(f"MODEL={r.model} SCHEDULE={r.schedule}" for r in table.values())
    raise UsageError(f"no released checkpoint of {key} in the table: the releases are {known}")


def as_record(release: Release) -> dict:
    return asdict(release)
