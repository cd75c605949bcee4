"""`npp compare runs` / `make compare-runs`: the whole fair NPP-vs-NTP experiment, for several seeds, in one command.

For each seed it trains the NTP run (`--schedule 1:1`, `--epochs E`) with the branch points of the
compute-matched budgets (`--branch-epochs`), each NPP schedule's run of E epochs, the NTP branches
(`npp train branch`: each a shorter run for its decay's cost), then samples and evaluates every
end with one protocol (the same samples per class, guidance, temperature, top-k, reference and
feature network), and finally runs `npp compare`. Locally every job runs in order through the
same commands a user types (torchrun for training and sampling); with `--slurm` each is an sbatch
job of slurm/train.sbatch or slurm/sample.sbatch, chained by `--dependency=afterok`, and the
comparison is a last job after all of them. A rerun skips what is done: finished runs, complete
samples, cached metrics (each command resumes what is not).

The default branches are the compute-matched epochs of each NPP schedule (`npp schedule` prints
them: E x its cost ratio, rounded) and E/4, E/2 and 3E/4 for the frontier's shape; the comparison
interpolates NTP's annealed ends in log-FLOPs, so NPP's FID must lie between two of them to get a
ratio (else it prints the bound).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from npp.errors import NppError, UsageError
from npp.runtime.flags import Checked, documented, flag
from npp.runtime.mlflow_utils import EXPERIMENT
from npp.runtime.ranks import free_port
from npp.train.config import DEFAULT_SCHEDULE


class ExperimentError(NppError, RuntimeError):
    """A job of the experiment failed; the message names it and how to go on."""


@documented
@dataclass(frozen=True)
class CompareRunsConfig(Checked):
    """The flags of `npp compare runs`."""

    shards: str = flag(help="the shard set (with a held-out split, `npp tokenize run --val-share`, for val/loss_k1)")
    vq: str = flag(help="the tokenizer the shards were made with (decodes the samples)")
    ref: str = flag(help="the FID reference (ADM's batch, or statistics from `npp eval ref`)")
    out: str = flag("runs/compare", "directory of every run (one folder each) and of the comparison")
    model: str = flag("GPT-B", "model size")
    epochs: int = flag(300, "epochs of the NTP run and of every NPP run")
    seeds: str = flag("0", "comma-separated seeds: each trains every run once")
    schedules: str = flag(DEFAULT_SCHEDULE, "NPP schedules, separated by ';' (e.g. '4:0.25,2:0.25,1:0.5;2:0.5,1:0.5')")
    branch_epochs: str = flag("", "NTP budgets branched off the NTP run, e.g. '75,150,173,225' (default: each "
                                  "schedule's compute-matched epochs, and E/4, E/2, 3E/4)")
    train_flags: str = flag("", "more `npp train` flags for every run, e.g. '--global-batch 256 --lr 1e-4'")
    inception: str = flag("", "FID Inception weights")
    classifier: str = flag("", "or a toy classifier as the feature network")
    per_class: int = flag(50, "samples per class of every end's evaluation (FID-50k: 50)")
    cfg_scale: float = flag(2.0, "guidance scale of every end's samples")
    temperature: float = flag(1.0, "sampling temperature")
    top_k: int = flag(0, "top-k (0 = all)")
    sample_flags: str = flag("", "more `npp sample` flags for every end")
    experiment: str = flag(EXPERIMENT, "MLflow experiment of every run and of the comparison")
    nproc: int = flag(1, "processes per node (GPUs) for training and sampling")
    sample_nproc: int = flag(0, "processes for sampling here (0: --nproc); 1 samples in one process, no torchrun")
    slurm: bool = flag(False, "submit every job with sbatch (dependencies chained) instead of running them here")
    nodes: int = flag(1, "--slurm: nodes per training job")
    sbatch_flags: str = flag("", "--slurm: more sbatch flags, e.g. '--partition=gpu --account=me'")
    dry_run: bool = flag(False, "print the commands (or sbatch submissions) without running them")

    def validate(self) -> None:
        from npp.models.configs import GPT_SIZES
        from npp.train.schedule import parse_schedule

        if self.model not in GPT_SIZES:
            raise UsageError(f"--model {self.model!r} is not a model size: one of {', '.join(GPT_SIZES)}")
        for text in self.schedule_list():
            if len(parse_schedule(text)) < 2:
                raise UsageError(f"--schedules {text!r}: an NPP schedule has a coarse stage (the NTP run is added "
                                 "on its own)")
        if not self.seed_list():
            raise UsageError("--seeds is empty: give one or more seeds, e.g. 0,1,2")
        if int(self.epochs) < 4 or int(self.per_class) < 1 or int(self.nproc) < 1:
            raise UsageError("--epochs must be at least 4, --per-class and --nproc at least 1")
        from npp.pipeline.eval_spec import EvalSpec

        EvalSpec(vq=self.vq, ref=self.ref, inception=self.inception, classifier=self.classifier).validate()

    def seed_list(self) -> list[int]:
        return [int(s) for s in str(self.seeds).split(",") if s.strip()]

    def schedule_list(self) -> list[str]:
        return [s.strip() for s in str(self.schedules).split(";") if s.strip()]


def compute_matched_branches(schedules: list[str], epochs: int, model: str, grid: tuple[int, int] | None = None
                             ) -> list[int]:
    """Each schedule's compute-matched NTP epochs, rounded (`npp schedule` prints them), within (0, epochs)."""
    from npp.models.configs import gpt_config
    from npp.train.schedule import compute_matched_epochs, parse_schedule

    cfg = gpt_config(model, **({"block_size": grid[0] * grid[1], "grid": grid} if grid else {}))
    points = {round(compute_matched_epochs(parse_schedule(s), epochs, cfg)) for s in schedules}
    return sorted(p for p in points if 0 < p < epochs)


def default_branches(schedules: list[str], epochs: int, model: str, grid: tuple[int, int] | None = None) -> list[int]:
    """Each schedule's compute-matched NTP epochs, and E/4, E/2, 3E/4: the frontier's points."""
    points = set(compute_matched_branches(schedules, epochs, model, grid))
    points |= {epochs // 4, epochs // 2, 3 * epochs // 4}
    return sorted(p for p in points if 0 < p < epochs)


@dataclass
class Job:
    """One step of the experiment: what it runs (a command line) and what must be done before it."""

    name: str
    kind: str  # train | branch | sample | compare
    args: list[str]  # npp's flags for the command
    run: Path | None = None  # the run folder it writes (train, branch) or samples (sample)
    after: list[str] = field(default_factory=list)


class Experiment:
    def __init__(self, cfg: CompareRunsConfig, base_flags: dict | None = None, eval_args: list[str] | None = None):
        """`base_flags`: the `npp train` flags every run shares (the demo passes its own); `eval_args`: the
        `npp eval` flags (reference, feature network)."""
        self.cfg, self.out = cfg, Path(cfg.out)
        self.seeds, self.schedules = cfg.seed_list(), cfg.schedule_list()
        self.base = dict(base_flags or {})
        self.extra_train = shlex.split(cfg.train_flags)
        self.eval_args = eval_args if eval_args is not None else (
            ["--ref", cfg.ref] + (["--inception", cfg.inception] if cfg.inception else [])
            + (["--classifier", cfg.classifier] if cfg.classifier else []))

    def branches(self) -> list[int]:
        from npp.train.config import TrainConfig

        if str(self.cfg.branch_epochs).strip():
            return TrainConfig(shards="", out="", branch_epochs=self.cfg.branch_epochs).branch_epoch_list()
        return default_branches(self.schedules, int(self.cfg.epochs), self.cfg.model, self._grid())

    def _grid(self) -> tuple[int, int] | None:
        try:
            from npp.pipeline.shards import open_shard_sets

            return tuple(open_shard_sets(self.cfg.shards)[0]["grid"])
        except (NppError, OSError, KeyError):
            return None

    def name(self, kind: str, seed: int, schedule: str = "", epochs: int = 0) -> str:
        """Run names: short when there is one of a kind (`npp`, `ntp`, `ntp-e18`), with the schedule and seed
        when there are several (`npp-4x0.25_2x0.25_1x0.5-s1`)."""
        if kind == "npp":
            name = "npp" + (f"-{schedule.replace(':', 'x').replace(',', '_')}" if len(self.schedules) > 1 else "")
        else:
            name = "ntp" + (f"-e{epochs}" if kind == "branch" else "")
        return name + (f"-s{seed}" if len(self.seeds) > 1 else "")

    def train_args(self, run: Path, seed: int, schedule: str, branch_epochs: list[int] = ()) -> list[str]:
        flags = {"shards": self.cfg.shards, "out": run, "model": self.cfg.model, "epochs": self.cfg.epochs,
                 **self.base, "schedule": schedule, "seed": seed, "experiment": self.cfg.experiment,
                 "run_name": run.name}
        if branch_epochs:
            flags["branch_epochs"] = ",".join(map(str, branch_epochs))
        return [w for k, v in flags.items() for w in (f"--{k.replace('_', '-')}", str(v))] + self.extra_train

    def jobs(self) -> list[Job]:
        c, jobs = self.cfg, []
        branches = self.branches()
        for seed in self.seeds:
            ntp = self.out / self.name("ntp", seed)
            jobs.append(Job(ntp.name, "train", self.train_args(ntp, seed, "1:1", branches), ntp))
            for schedule in self.schedules:
                run = self.out / self.name("npp", seed, schedule)
                jobs.append(Job(run.name, "train", self.train_args(run, seed, schedule), run))
            for epochs in branches:
                run = self.out / self.name("branch", seed, epochs=epochs)
                jobs.append(Job(run.name, "branch", ["--from", str(ntp), "--epochs", str(epochs), "--out", str(run),
                                                     "--run-name", run.name], run, [ntp.name]))  # compare names it
        for j in [j for j in jobs if j.kind in ("train", "branch")]:
            samples = j.run / "samples"
            args = ["--ckpt", str(j.run / "model.pt"), "--vq", c.vq, "--out", str(samples), "--per-class",
                    str(c.per_class), "--cfg-scale", str(c.cfg_scale), "--temperature", str(c.temperature),
                    "--top-k", str(c.top_k), *shlex.split(c.sample_flags)]
            jobs.append(Job(f"{j.name}-eval", "sample", args, samples, [j.name]))
        runs = ",".join(j.name for j in jobs if j.kind in ("train", "branch"))  # this experiment's runs alone
        jobs.append(Job("compare", "compare", ["--experiment", c.experiment, "--out", str(self.out / "compare"),
                                               "--runs", runs], None, [j.name for j in jobs]))
        return jobs

    # --- here ------------------------------------------------------------------------------------------------
    def local_commands(self, job: Job) -> list[list[str]]:
        npp = [sys.executable, "-m", "npp"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.cfg.nproc),
                    "--master-port", str(free_port()), "-m", "npp"]
        world = ["--world-size", str(self.cfg.nproc)]
        if job.kind == "train":  # checked first: a refused flag is one line, not torchrun's traceback
            return [npp + ["train", "check", *job.args, *world], torchrun + ["train", *job.args]]
        if job.kind == "branch":
            return [npp + ["train", "branch", *job.args, "--check", *world], torchrun + ["train", "branch", *job.args]]
        if job.kind == "sample":
            ckpt = job.args[job.args.index("--ckpt") + 1]
            merged = job.run / f"samples_cfg{self.cfg.cfg_scale:g}.npz"
            nproc = int(self.cfg.sample_nproc) or int(self.cfg.nproc)
            sampler = (npp if nproc == 1 else torchrun[:4] + [str(nproc)] + torchrun[5:]) + ["sample", *job.args]
            evaluate = npp + ["eval", "--samples", str(merged), "--ckpt", ckpt, "--experiment", self.cfg.experiment,
                              *self.eval_args]
            # samples made already of this model with these settings (a rerun, or `make demo`'s): only their
            # evaluation (its metrics are cached); anything else goes through `npp sample`, which resumes or refuses
            return ([] if self.sampled(merged, ckpt) else [sampler]) + [evaluate]
        return [npp + ["compare", *job.args]]

    def sampled(self, merged: Path, ckpt: str) -> bool:
        """Samples of `ckpt` (made after it) with this experiment's settings are at `merged` already."""
        import json

        record = merged.with_suffix(".json")
        if not (merged.exists() and record.exists() and os.path.exists(ckpt)):
            return False
        if os.path.getmtime(merged) < os.path.getmtime(ckpt):
            return False
        r, c = json.loads(record.read_text()), self.cfg
        return (os.path.abspath(str(r.get("ckpt"))) == os.path.abspath(ckpt) and r.get("per_class") == c.per_class
                and float(r.get("cfg_scale", -1)) == float(c.cfg_scale)
                and float(r.get("temperature", -1)) == float(c.temperature) and r.get("top_k") == c.top_k)

    def done(self, job: Job) -> bool:
        """A finished run (its latest checkpoint at its last step, exported): training is not started again."""
        if job.kind not in ("train", "branch") or not (job.run / "model.pt").exists():
            return False
        from npp.pipeline.runs import RunFolder, tag_step

        folder = RunFolder(job.run)
        latest = folder.latest_tag()
        return bool(latest) and folder.config.exists() and tag_step(latest) == folder.read_config()["total_steps"]

    def run_here(self, env: dict | None = None, runners: dict | None = None) -> None:
        """Every job here, in order; `runners` {kind: callable(job)} runs a kind in this process instead (the
        demo samples and evaluates its toy models in-process: a new process's imports and MLflow store set-up
        cost more than the work)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for job in self.jobs():
            if self.done(job):
                print(f"[npp compare runs] {job.name}: finished already", flush=True)
                continue
            if job.kind in (runners or {}):
                print(f"[npp compare runs] {job.name}: in this process", flush=True)
                if not self.cfg.dry_run:
                    runners[job.kind](job)
                continue
            for cmd in self.local_commands(job):
                print(f"[npp compare runs] {job.name}: {shlex.join(cmd)}", flush=True)
                if self.cfg.dry_run:
                    continue
                if subprocess.run(cmd, env=env).returncode != 0:
                    raise ExperimentError(f"{job.name} failed: rerun the same command to resume it (every finished "
                                          "run, sample and evaluation is kept)")

    # --- SLURM -------------------------------------------------------------------------------------------------
    def sbatch_command(self, job: Job, ids: dict[str, str]) -> tuple[list[str], dict]:
        c, root = self.cfg, Path(__file__).resolve().parents[2]
        deps = [ids[a] for a in job.after if a in ids]
        head = ["sbatch", "--parsable", *shlex.split(c.sbatch_flags)] + (
            [f"--dependency=afterok:{':'.join(deps)}"] if deps else [])
        env = {"GPUS_PER_NODE": str(c.nproc)}
        if job.kind in ("train", "branch"):
            env.update(TRAIN_ARGS=shlex.join(job.args),
                       TRAIN_COMMAND="train" if job.kind == "train" else "train branch")
            script = str(root / "slurm" / "train.sbatch")
            return head + [f"--job-name=npp-{job.name}", f"--nodes={c.nodes}", script], env
        if job.kind == "sample":
            ckpt = job.args[job.args.index("--ckpt") + 1]
            env.update(SAMPLE_ARGS=shlex.join(job.args), EVAL_ARGS=shlex.join(
                [*self.eval_args, "--ckpt", ckpt, "--experiment", c.experiment]))
            return head + [f"--job-name=npp-{job.name}", "--nodes=1", str(root / "slurm" / "sample.sbatch")], env
        npp = shlex.join([sys.executable, "-m", "npp", "compare", *job.args])
        return head + ["--job-name=npp-compare", "--output=logs/%x_%j.out", "--nodes=1", "--ntasks=1",
                       f"--wrap={npp}"], env

    def submit(self) -> dict[str, str]:
        """Submit every job not done yet, each after the jobs it needs; returns {job: SLURM job id}."""
        ids: dict[str, str] = {}
        Path("logs").mkdir(exist_ok=True)
        for job in self.jobs():
            if self.done(job):
                continue
            cmd, env = self.sbatch_command(job, ids)
            print(f"[npp compare runs] {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} {shlex.join(cmd)}",
                  flush=True)
            if self.cfg.dry_run:
                ids[job.name] = f"<{job.name}>"
                continue
            proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ExperimentError(f"sbatch refused {job.name}: {proc.stderr.strip()[:300]}; the jobs submitted "
                                      f"so far: {ids}")
            ids[job.name] = proc.stdout.strip().split(";")[0]
        print(f"[npp compare runs] submitted {len(ids)} jobs; the comparison runs last ({ids.get('compare')})")
        return ids


def compare_runs(cfg: CompareRunsConfig) -> None:
    """Run (or submit) the experiment, then `npp compare` (see the module's docstring). `cfg`: its plan
    (CompareRunsConfig.plan(): checked)."""
    exp = Experiment(cfg)
    print(f"[npp compare runs] seeds {exp.seeds}; NPP {exp.schedules}; NTP {cfg.epochs} epochs with branches at "
          f"{exp.branches()} epochs; every end sampled {cfg.per_class} per class at cfg {cfg.cfg_scale:g}",
          flush=True)
    exp.submit() if cfg.slurm else exp.run_here()
