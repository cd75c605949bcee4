"""`npp reproduce` / `make reproduce MODEL=GPT-B SCHEDULE=npp`: a released checkpoint's published FID, measured.

It takes the release from npp.eval.published (LlamaGen's NTP GPTs and the NPP authors' GPTs at 256 px: the
download location, the published FID and the sampling settings that gave it), fetches what is missing through
`npp assets` (the GPT, LlamaGen's VQ, ADM's reference batch, the Inception weights), samples with the published
settings (`npp sample`: resumable, one process here or torchrun over --nproc GPUs, or a SLURM job), evaluates
against the reference (`npp eval`: the metrics cached beside the samples with their provenance, logged into an
MLflow run named after the release), and prints published against measured. A FID further from the published one
than the tolerance (npp.eval.published.tolerance: the toy set's sampling spread scaled to the number of samples)
is flagged in one line, naming every setting that was overridden (a smaller --num-samples, another --cfg-scale, a
toy feature network ...). OUT/NAME/reproduce.json keeps the release, the settings used, the overrides, the
metrics and their provenance.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from npp.errors import UsageError
from npp.eval.published import Release, as_record, find_release, load_table, tolerance
from npp.pipeline.assets import ASSET_DIR
from npp.runtime.flags import Checked, documented, flag, need
from npp.runtime.ranks import free_port

# The assets a published FID is measured with (npp.pipeline.assets' names).
VQ_ASSET, REF_ASSET, INCEPTION_ASSET = ("vq_ds16_c2i.pt", "VIRTUAL_imagenet256_labeled.npz",
                                       "pt_inception-2015-12-05-6726825d.pth")
PUBLISHED_EVAL = {"ref": REF_ASSET, "feature_net": "Inception-v3 (pt_inception-2015-12-05)"}


@documented
@dataclass(frozen=True)
class ReproduceConfig(Checked):
    """The flags of `npp reproduce`."""

    model: str = flag("GPT-B", "model size of the release (`npp reproduce list` shows the releases)")
    schedule: str = flag("npp", "npp: the NPP authors' checkpoint; ntp: LlamaGen's", choices=("npp", "ntp"))
    out: str = flag("reproduce", "directory of the samples, metrics and report (one folder per release)")
    assets: str = flag(ASSET_DIR, "directory of the downloaded files (`npp assets --out`); missing ones are fetched")
    table: str = flag("", "a JSON table of releases instead of npp's (see npp/eval/published.py)")
    num_samples: int = flag(0, "samples (0: the published number, 50,000)")
    cfg_scale: float = flag(0.0, "guidance scale (0: the published one)")
    temperature: float = flag(0.0, "sampling temperature (0: the published one)")
    top_k: int = flag(-1, "top-k (-1: the published one)")
    precision: str = flag("", "fp32 or bf16 (default: the published bf16)")
    seed: int = flag(0, "sampling seed (npp sample --seed)")
    batch: int = flag(0, "samples per piece (0: as large as the GPU holds)")
    vq: str = flag("", "the VQ tokenizer (default: LlamaGen's vq_ds16_c2i.pt from --assets)")
    ref: str = flag("", "the reference (default: ADM's VIRTUAL_imagenet256_labeled.npz from --assets)")
    inception: str = flag("", "FID Inception weights (default: from --assets)")
    classifier: str = flag("", "a toy classifier as feature network instead of Inception (not the published one)")
    tolerance: float = flag(0.0, "flag a FID this far from the published one (0: derived, see npp/eval/published.py)")
    experiment: str = flag("reproduce", "MLflow experiment of the evaluation")
    nproc: int = flag(1, "sampling processes (GPUs); more than 1 runs torchrun")
    slurm: bool = flag(False, "sample and evaluate as a SLURM job (slurm/sample.sbatch), then report in a job after it")
    nodes: int = flag(1, "--slurm: nodes of the sampling job")
    sbatch_flags: str = flag("", "--slurm: more sbatch flags, e.g. '--partition=gpu --account=me'")
    dry_run: bool = flag(False, "print what would run without running it")

    def release(self) -> Release:
        return find_release(load_table(self.table), self.model, self.schedule)

    def validate(self) -> None:
        self.release()
        if int(self.num_samples) < 0 or float(self.cfg_scale) < 0 or float(self.temperature) < 0:
            raise UsageError("--num-samples, --cfg-scale and --temperature take 0 for the published value, or more")
        if self.precision not in ("", "fp32", "bf16"):
            raise UsageError(f"--precision must be fp32 or bf16 (default: the published bf16), got {self.precision!r}")
        if self.inception and self.classifier:
            raise UsageError("--inception and --classifier both name a feature network: pass one")
        if int(self.nproc) < 1:
            raise UsageError(f"--nproc must be at least 1, got {self.nproc}")


def settings_used(cfg: ReproduceConfig, release: Release) -> tuple[dict, dict]:
    """The sampling settings this run uses, and {setting: (published, used)} for each that differs."""
    used = release.sampling()
    asked = {"num_samples": int(cfg.num_samples) or None, "cfg_scale": float(cfg.cfg_scale) or None,
             "temperature": float(cfg.temperature) or None, "top_k": int(cfg.top_k) if int(cfg.top_k) >= 0 else None,
             "precision": cfg.precision or None}
    used.update({k: v for k, v in asked.items() if v is not None})
    overridden = {k: (release.sampling()[k], v) for k, v in used.items() if release.sampling()[k] != v}
    if cfg.ref:
        overridden["reference"] = (PUBLISHED_EVAL["ref"], cfg.ref)
    if cfg.classifier:
        overridden["feature_net"] = (PUBLISHED_EVAL["feature_net"], f"toy classifier {cfg.classifier}")
    return used, overridden


class Reproduction:
    def __init__(self, cfg: ReproduceConfig):
        self.cfg, self.release = cfg, cfg.release()
        self.settings, self.overridden = settings_used(cfg, self.release)
        self.folder = Path(cfg.out) / self.release.name
        assets = Path(cfg.assets)
        self.ckpt = str(assets / self.release.asset)
        self.vq = cfg.vq or str(assets / VQ_ASSET)
        self.ref = cfg.ref or str(assets / REF_ASSET)
        self.inception = "" if cfg.classifier else (cfg.inception or str(assets / INCEPTION_ASSET))
        self.samples = self.folder / "samples" / f"samples_cfg{self.settings['cfg_scale']:g}.npz"
        self._run_id: str | None = None

    def needed_assets(self) -> list[str]:
        names = [self.release.asset]
        names += [] if self.cfg.vq else [VQ_ASSET]
        names += [] if self.cfg.ref else [REF_ASSET]
        names += [] if (self.cfg.classifier or self.cfg.inception) else [INCEPTION_ASSET]
        return names

    def sample_flags(self) -> dict:
        """`npp sample`'s flags for the published settings (and the overrides)."""
        s = self.settings
        return {"ckpt": self.ckpt, "vq": self.vq, "out": str(self.folder / "samples"), "labels": s["labels"],
                "num_samples": s["num_samples"], "cfg_scale": s["cfg_scale"], "temperature": s["temperature"],
                "top_k": s["top_k"], "top_p": s["top_p"], "cfg_interval": s["cfg_interval"],
                "precision": s["precision"], "seed": int(self.cfg.seed), "batch": int(self.cfg.batch)}

    def sample_args(self) -> list[str]:
        return [w for k, v in self.sample_flags().items() for w in (f"--{k.replace('_', '-')}", str(v))]

    def eval_args(self) -> list[str]:
        feature = ["--classifier", self.cfg.classifier] if self.cfg.classifier else ["--inception", self.inception]
        return ["--ref", self.ref, *feature, "--experiment", self.cfg.experiment]

    def sampled(self) -> bool:
        """Samples of this checkpoint with these settings are complete already (a rerun only evaluates them:
        `npp sample` would merge them again, and a new file is a new evaluation)."""
        record = self.samples.with_suffix(".json")
        if not (self.samples.exists() and record.exists()):
            return False
        r = json.loads(record.read_text())
        same = {k: r.get(k) for k in ("labels", "num_samples", "cfg_scale", "temperature", "top_k", "top_p",
                                      "cfg_interval", "precision", "seed")}
        want = {**{k: self.settings[k] for k in same if k != "seed"}, "seed": self.cfg.seed}
        return os.path.abspath(str(r.get("ckpt"))) == os.path.abspath(self.ckpt) and same == want

    # --- here ----------------------------------------------------------------------------------------------------
    def fetch(self) -> None:
        from npp.pipeline.assets import fetch_assets

        fetch_assets(self.cfg.assets, self.needed_assets())

    def sample(self) -> None:
        if self.sampled():
            print(f"[npp reproduce] {self.samples}: made already with these settings", flush=True)
            return
        if int(self.cfg.nproc) == 1:  # in this process: `npp sample`'s code, without a second start-up
            from npp.eval.config import SampleConfig
            from npp.eval.sample import sample

            sample(SampleConfig(**self.sample_flags()).plan())
            return
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.cfg.nproc),
               "--master-port", str(free_port()), "-m", "npp", "sample", *self.sample_args()]
        print(f"[npp reproduce] {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise UsageError(f"sampling {self.release.name} failed: rerun the same command to resume it")

    def evaluate(self) -> dict:
        """The metrics (cached beside the samples), logged into the MLflow run named after the release."""
        from npp.eval.evaluate import evaluate

        run_id = self.mlflow_run()
        inception = self.inception or None
        results = evaluate(str(self.samples), self.ref, run_id, None, inception, self.cfg.classifier or None,
                           self.cfg.experiment, True)
        return next(iter(results.values()))

    def mlflow_run(self) -> str:
        """The release's run for these samples (found or made once per command)."""
        if self._run_id:
            return self._run_id
        self._run_id = self._find_or_create_run()
        return self._run_id

    def _find_or_create_run(self) -> str:
        import mlflow

        from npp.runtime.mlflow_utils import mark_training_experiment, tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        client = mlflow.tracking.MlflowClient()
        exp = mark_training_experiment(self.cfg.experiment)
        name = f"reproduce {self.release.name}" + (" (settings overridden)" if self.overridden else "")
        samples = os.path.abspath(self.samples)  # one run per set of samples: a rerun finds its run again
        found = client.search_runs([exp], filter_string=f"tags.`npp.reproduce.samples` = '{samples}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(exp, run_name=name, tags={"npp.reproduce": self.release.name,
                                                          "npp.reproduce.samples": samples}).info.run_id
        for k, v in {"release": self.release.name, "model": self.release.model, "schedule": self.release.schedule,
                     "published_fid": self.release.fid, "published_source": self.release.source,
                     **{f"sampling.{k}": v for k, v in self.settings.items()},
                     **{f"overridden.{k}": f"{a} -> {b}" for k, (a, b) in self.overridden.items()}}.items():
            client.log_param(run, k, v)
        return run

    def report(self, metrics: dict) -> dict:
        """Published against measured, the flag, and the record (OUT/NAME/reproduce.json)."""
        fid_key = next(k for k in metrics if k.startswith("fid"))
        fid, published = float(metrics[fid_key]), self.release.fid
        tol = float(self.cfg.tolerance) or tolerance(published, self.settings["num_samples"])
        diff = fid - published
        flagged = abs(diff) > tol
        lines = [f"{self.release.name} ({self.release.source})", f"{'metric':<22}{'published':>11}{'measured':>11}"
                 f"{'difference':>12}",
                 f"{fid_key:<22}{published:>11.2f}{fid:>11.2f}{diff:>+12.2f}"]
        lines += [f"{k:<22}{'-':>11}{v:>11.4f}" for k, v in metrics.items() if k != fid_key]
        changed = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in self.overridden.items())
        if flagged:
            lines.append(f"FLAGGED: {fid_key} {fid:.2f} is {abs(diff):.2f} {'above' if diff > 0 else 'below'} the "
                         f"published {published:.2f} (tolerance {tol:.2f})" +
                         (f"; settings that differ from the publication: {changed}" if changed else
                          "; every setting is the published one"))
        else:
            lines.append(f"within tolerance: {fid_key} {fid:.2f} vs published {published:.2f} (tolerance {tol:.2f})"
                         + (f"; settings that differ from the publication: {changed}" if changed else ""))
        print("\n".join(lines), flush=True)
        cache = self.samples.with_suffix(".metrics.json")
        record = {"release": as_record(self.release), "settings": self.settings, "seed": self.cfg.seed,
                  "overridden": {k: {"published": a, "used": b} for k, (a, b) in self.overridden.items()},
                  "metrics": metrics, "published_fid": published, "difference": diff, "tolerance": tol,
                  "flagged": flagged, "samples": str(self.samples),
                  "provenance": json.loads(cache.read_text()).get("provenance") if cache.exists() else None}
        (self.folder / "reproduce.json").write_text(json.dumps(record, indent=2, default=str))
        self.log_result(record, fid_key)
        return record

    def log_result(self, record: dict, fid_key: str) -> None:
        """Beside the measured metrics in the release's run: the published FID, the difference, the tolerance, the
        flag, and the record; a rerun logs no point twice."""
        import mlflow

        from npp.runtime.metric_names import for_mlflow, naming_of
        from npp.runtime.outbox import Delivery

        client, run = mlflow.tracking.MlflowClient(), self.mlflow_run()
        beside = {f"{fid_key}_published": record["published_fid"], f"{fid_key}_difference": record["difference"],
                  f"{fid_key}_tolerance": record["tolerance"]}  # under Results/ beside the FID, as `npp eval` logs it
        naming = naming_of(client.get_run(run).data.metrics)
        Delivery(client, run).send({"step": 0, "metrics": for_mlflow(beside, naming)})
        client.set_tag(run, "npp.reproduce.flagged", str(record["flagged"]).lower())
        client.log_artifact(run, str(self.folder / "reproduce.json"))
        client.set_terminated(run)

    # --- SLURM ---------------------------------------------------------------------------------------------------
    def submit(self) -> None:
        root = Path(__file__).resolve().parents[2]
        # the sampling job evaluates on its GPU and caches the metrics (--nolog); the report job logs them once,
        # into the release's run, with the comparison
        env = {"SAMPLE_ARGS": shlex.join(self.sample_args()), "EVAL_ARGS": shlex.join([*self.eval_args(), "--nolog"]),
               "GPUS_PER_NODE": str(self.cfg.nproc)}
        head = ["sbatch", "--parsable", *shlex.split(self.cfg.sbatch_flags)]
        sample = head + [f"--job-name=npp-reproduce-{self.release.name}", f"--nodes={self.cfg.nodes}",
                         str(root / "slurm" / "sample.sbatch")]
        print(f"[npp reproduce] {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} {shlex.join(sample)}",
              flush=True)
        if self.cfg.dry_run:
            return
        Path("logs").mkdir(exist_ok=True)
        proc = subprocess.run(sample, env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"sbatch refused the sampling job: {proc.stderr.strip()[:300]}")
        job = proc.stdout.strip().split(";")[0]
        again = [sys.executable, "-m", "npp", "reproduce", *flags_of(self.cfg, slurm=False, nproc=1)]
        report = head + [f"--dependency=afterok:{job}", "--job-name=npp-reproduce-report", "--output=logs/%x_%j.out",
                         "--nodes=1", "--ntasks=1", f"--wrap={shlex.join(again)}"]
        proc = subprocess.run(report, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"sbatch refused the report job: {proc.stderr.strip()[:300]} (sampling job {job} runs; "
                             "`npp reproduce` with the same flags reports when it is done)")
        print(f"[npp reproduce] sampling job {job}; the report runs after it ({proc.stdout.strip()})", flush=True)


def flags_of(cfg: ReproduceConfig, **changes) -> list[str]:
    """The command line of this config (with `changes`), as `npp reproduce` takes it."""
    words = []
    for k, v in {**asdict(cfg), **changes}.items():
        name = f"--{k.replace('_', '-')}"
        if isinstance(v, bool):
            words.append(name if v else f"--no{k.replace('_', '-')}")
        elif v not in ("", None):
            words += [name, str(v)]
    return words


def reproduce(cfg: ReproduceConfig) -> dict | None:
    """Fetch, sample, evaluate and report (see the module's docstring); with --slurm, submit and return. `cfg`: its
    plan (ReproduceConfig.plan(): checked)."""
    r = Reproduction(cfg)
    changed = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in r.overridden.items()) or "none"
    print(f"[npp reproduce] {r.release.name}: {r.settings['num_samples']} samples, cfg {r.settings['cfg_scale']:g}, "
          f"labels {r.settings['labels']}, {r.settings['precision']}; overridden: {changed}", flush=True)
    if cfg.dry_run and not cfg.slurm:
        print(f"[npp reproduce] would fetch {', '.join(r.needed_assets())} into {cfg.assets}, sample "
              f"`npp sample {shlex.join(r.sample_args())}`, evaluate `npp eval --samples {r.samples} "
              f"{shlex.join(r.eval_args())}`", flush=True)
        return None
    if not cfg.dry_run:
        r.fetch()
    if cfg.slurm:
        r.submit()
        return None
    r.folder.mkdir(parents=True, exist_ok=True)
    r.sample()
    return r.report(r.evaluate())


@documented
@dataclass(frozen=True)
class ReleasesConfig(Checked):
    """The flags of `npp reproduce list`."""

    table: str = flag("", "a JSON table of releases instead of npp's")

    def validate(self) -> None:
        need(not self.table or os.path.isfile(self.table), f"--table {self.table} does not exist: pass a JSON table "
             "of releases (see npp/eval/published.py), or leave it out for npp's")


def release_lines(table: str = "") -> list[str]:
    """`npp reproduce list`: each release, its published FID and settings."""
    lines = [f"{'MODEL':<9}{'SCHEDULE':<10}{'FID':>6}{'cfg':>6}  asset (npp assets --only)  source"]
    for r in load_table(table).values():
        lines.append(f"{r.model:<9}{r.schedule:<10}{r.fid:>6.2f}{r.cfg_scale:>6.2f}  {r.asset:<26} {r.source}")
    return lines
