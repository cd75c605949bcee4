"""The `npp` command: one fire CLI whose subcommands are the pipeline's stages.

fire reads each command as it is: functions, and classes whose constructor is a stage's
config dataclass (`TrainCommand` is a `TrainConfig`: its fields are the flags, with one name
and one default), with static methods for their subcommands (`npp train export`). Fire hands
back the config it built; `run_command` validates it and executes it. The command table is built
without importing torch: a wrong flag fails in a fraction of a second; each stage's
implementation is imported when its command runs. This package (npp.app) is the only one
that imports more than one stage.
"""

from __future__ import annotations

import os
import sys

# Progress bars written to a log file (SLURM, CI): one update every 10 s, not one per batch.
# tqdm reads TQDM_* overrides when it is first imported, so this comes before every import.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "10")

import difflib  # noqa: E402
import inspect  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import fire  # noqa: E402

from npp.app.demo import DemoConfig  # noqa: E402
from npp.app.experiment import CompareRunsConfig  # noqa: E402
from npp.app.help import render as render_help  # noqa: E402
from npp.app.reproduce import ReproduceConfig  # noqa: E402
from npp.errors import NppError, UsageError  # noqa: E402
from npp.eval.config import SampleConfig, WatchConfig  # noqa: E402
from npp.runtime import environment  # noqa: E402
from npp.runtime.flags import HELP_WORDS, HelpRequested, as_fire_args, documented, parse_flags  # noqa: E402
from npp.runtime.ranks import is_rank_zero  # noqa: E402
from npp.tokenize.config import TokenizeConfig  # noqa: E402
from npp.train.config import TrainConfig  # noqa: E402


class Command:
    """A config that is also a command: fire builds it from the flags, `run_command` checks it into a plan (what
    the stage runs, resolved: nothing is checked twice) and executes that. `subcommands` names the methods that
    are commands (`npp train export`); no other method is one."""

    subcommands: tuple = ()

    def plan(self) -> Any:
        """Everything that can be checked without torch, checked; returns what `execute` runs."""
        return self

    def execute(self, plan: Any) -> None:  # not `run`: a config may have a field of that name (eval watch --run)
        raise NotImplementedError


def run_command(result: Any) -> Any:
    """fire's `serialize` hook: run the command fire built (a Command); anything else passes through."""
    if isinstance(result, Command):
        result.execute(result.plan())
        return None
    return result


def models(vocab_size: int = 16384, num_classes: int = 1000, block_size: int = 256) -> None:
    """List the model sizes with their parameter counts.

    Args:
      vocab_size: codebook size of the tokenizer (LlamaGen's: 16384)
      num_classes: class labels (ImageNet: 1000)
      block_size: tokens per image (256 px / 16 = 16 x 16 = 256)
    """
    from npp.models.configs import GPT_SIZES, count_parameters, gpt_config

    print(f"{'name':<10} {'layers':>6} {'heads':>5} {'dim':>5} {'params':>15}")
    for name, (layers, heads, dim) in GPT_SIZES.items():
        cfg = gpt_config(name, vocab_size=vocab_size, num_classes=num_classes, block_size=block_size)
        print(f"{name:<10} {layers:>6} {heads:>5} {dim:>5} {count_parameters(cfg):>15,}")


def schedule(
    schedule: str = "",
    patch_levels: int = 0,
    epoch_rate: float = 0.5,
    epochs: int = 300,
    steps_per_epoch: int = 5004,
    model: str = "GPT-B",
    block_size: int = 256,
) -> None:
    """Show where each stage of a schedule starts and ends, and its cost relative to next-token training.

    Give `--schedule 4:0.25,2:0.25,1:0.5`, or the paper's `--patch-levels 3 --epoch-rate 0.5`.

    Args:
      schedule: patch_side:share,... (as `npp train --schedule`; default 1:1)
      patch_levels: >0: the paper's schedule with this many levels instead
      epoch_rate: the paper's stage boundary rate for --patch-levels
      epochs: the training budget in epochs
      steps_per_epoch: optimizer steps per epoch (ImageNet at batch 256: 5004)
      model: model size the cost is computed for
      block_size: tokens per image
    """
    from npp.models.configs import gpt_config
    from npp.train.schedule import PatchSchedule, paper_schedule, parse_schedule

    cfg = gpt_config(model, block_size=block_size)
    stages = (
        paper_schedule(patch_levels, epoch_rate, epochs)
        if patch_levels
        else parse_schedule(str(schedule or "1:1"), cfg.grid)
    )
    sched = PatchSchedule(stages, epochs * steps_per_epoch)
    for span, flops in zip(sched.spans, sched.flops_per_sample(cfg), strict=False):
        print(
            f"stage {span.index}: k={span.patch_side} steps [{span.start}, {span.end}) "
            f"epochs [{span.start / steps_per_epoch:g}, {span.end / steps_per_epoch:g}) "
            f"{flops / 1e9:.1f} GFLOP/sample"
        )
    ratio = sched.cost_ratio(cfg)
    print(f"training cost vs next-token prediction ({model}): {ratio:.4f}")
    if len(stages) > 1:  # the NTP run of the same training FLOPs: the branch `npp compare` needs beside it
        print(f"compute-matched NTP budget: {epochs * ratio:.2f} epochs (an NTP run with --branch-epochs "
              f"{round(epochs * ratio)}, then `npp train branch --epochs {round(epochs * ratio)}`)")


def toy(out: str, per_class: int = 200, size: int = 48, seed: int = 0) -> None:
    """Render the built-in toy dataset (10 classes of shapes and patterns) as an ImageFolder tree.

    Args:
      out: the ImageFolder root to write
      per_class: images per class
      size: pixels per side
      seed: seed of the drawing
    """
    from npp.pipeline.toy import write_toy_dataset

    n = write_toy_dataset(str(out), per_class, size, seed)
    print(f"toy dataset in {out}: {n} new images")


def fit_vq(data: str, out: str, preset: str = "VQ-toy", image_size: int = 32, max_steps: int = 1200,
           minutes: float = 0.0, batch: int = 32, lr: float = 3e-3, seed: int = 0) -> None:
    """Fit a small VQ tokenizer on a folder of images; writes a LlamaGen-format checkpoint and a PNG.

    The budget is --max-steps; --minutes > 0 adds a wall-clock cap (then the result depends on the machine).

    Args:
      data: ImageFolder directory of training images
      out: the checkpoint to write (.pt)
      preset: tokenizer size (VQ-toy)
      image_size: pixels of the training crops
      max_steps: optimizer steps (the budget)
      minutes: >0: also stop after this many minutes (machine-dependent)
      batch: images per step
      lr: learning rate
      seed: seed of weights and data order
    """
    from npp.tokenize.fit_vq import fit_vq

    fit_vq(str(data), str(out), preset=preset, image_size=image_size, max_steps=max_steps, minutes=minutes,
           batch=batch, lr=lr, seed=seed)


def finalize(out: str) -> None:
    """Merge every rank's shards into manifest.parquet and failures.parquet.

    Args:
      out: the shard-set directory of the array run
    """
    from npp.tokenize.run import finalize

    finalize(str(out))


@documented
@dataclass
class TokenizeCommand(TokenizeConfig, Command):
    """Encode images (ImageFolder or parquet) into VQ-code shards; reruns resume."""

    subcommands = ("check",)

    def plan(self) -> TokenizeConfig:
        self.validate()
        return self

    def execute(self, plan: TokenizeConfig) -> None:
        from npp.tokenize.run import tokenize

        tokenize(plan, checked=True)

    def check(self) -> None:
        """Check the flags and inputs as a run would (no torch, nothing written): the login-node check of
        `make tokenize-slurm` and of slurm/tokenize.sbatch."""
        self.plan()
        print(f"npp tokenize run: ok ({self.data} -> {self.out})")


@documented
@dataclass
class TrainCommand(TrainConfig, Command):
    """Train a GPT on a shard set with DeepSpeed and the NPP patch schedule (resumes from --out).

    `npp train export --run RUN` writes the consolidated model; `npp train convert --run RUN` makes the latest
    checkpoint loadable on any number of ranks; `npp train check ...` checks a run's flags and inputs without
    starting it.
    """

    subcommands = ("export", "convert", "check", "branch")

    def plan(self, world_size: int = 0):
        from npp.train.plan import make_plan

        return make_plan(self, world_size or None)

    def execute(self, plan) -> None:
        from npp.app.training import train_with_evaluation

        train_with_evaluation(plan)

    def check(self, world_size: int = 0) -> None:
        """Check the flags and inputs of a run as its start would (no torch, nothing written), for a job of
        --world-size ranks (default: this one's): the login-node check of `make train`, `make train-slurm` and of
        slurm/train.sbatch. Prints the plan.

        Args:
          world_size: the job's number of ranks (0: this process's WORLD_SIZE, else 1)
        """
        plan = self.plan(world_size)
        print(f"npp train: ok: {plan.describe()}")
        for note in plan.notes:
            print(f"npp train: note: {note}")
        if plan.changes:
            from npp.train.run_record import describe_changes

            print(f"npp train: {describe_changes(plan)}")

    @staticmethod
    def branch(from_: str, epochs: int, out: str, shards: str = "", run_name: str = "", tracking: bool = True,
               log_every: int = 0, ckpt_every: int = 0, eval_every_epochs: float = -1.0, eval_per_class: int = 0,
               world_size: int = 0, check: bool = False) -> None:
        """Train the E-epoch run that a longer single-stage run (started with --branch-epochs E) holds until its
        decay: from that run's checkpoint at the branch point, only the decay (the compute-matched NTP baseline, a
        fifth of its cost). Run it as `npp train` runs, under torchrun or srun, on the parent's number of ranks;
        a rerun resumes it.

        Args:
          from_: the parent run's directory (npp train --out, started with --branch-epochs)
          epochs: the branch's epochs (one of the parent's --branch-epochs)
          out: the branch's run directory
          shards: the shard set, if it moved (default: the parent's)
          run_name: MLflow run name (default: the model, NTP, its epochs and seed, and whose branch it is)
          tracking: log to MLflow (--notracking: not)
          log_every: steps between log lines (0: the parent's)
          ckpt_every: steps between checkpoints (0: the parent's)
          eval_every_epochs: FID evaluations during training, in epochs (-1: the parent's)
          eval_per_class: samples per class at each eval point (0: the parent's)
          world_size: with --check: plan for this many ranks
          check: check the branch as its start would (no torch, nothing written), then stop
        """
        from npp.train.branching import branch_config
        from npp.train.plan import make_plan

        overrides = {k: v for k, v in {"shards": shards, "run_name": run_name, "log_every": log_every,
                                       "ckpt_every": ckpt_every, "eval_per_class": eval_per_class}.items() if v}
        if float(eval_every_epochs) >= 0:
            overrides["eval_every_epochs"] = float(eval_every_epochs)
        if not tracking:
            overrides["tracking"] = False
        cfg, record = branch_config(str(from_), int(epochs), str(out), overrides)
        plan = make_plan(cfg, int(world_size) or None, branch=record)
        if check:
            print(f"npp train branch: ok: {plan.describe()}; from {record['parent']} at step {record['step']}")
            return
        from npp.app.training import train_with_evaluation

        train_with_evaluation(plan)

    @staticmethod
    def export(run: str, tag: str = "", out: str = "") -> None:
        """Write the consolidated fp32 checkpoint (LlamaGen format) of a run's latest (or --tag) checkpoint.

        Args:
          run: the run directory (npp train --out)
          tag: a checkpoint of the run (step_000001000; default: the latest)
          out: where to write it (default: RUN/model.pt)
        """
        from npp.pipeline.inputs import check_run_checkpoint

        check_run_checkpoint(run, tag)
        from npp.pipeline.runs import RunFolder, tag_step
        from npp.train.export import export
        from npp.train.tracking import tag_exported_model

        path = export(str(run), str(tag) or None, str(out) or None)
        folder = RunFolder(run)
        tag_exported_model(folder, path, tag_step(str(tag) or folder.latest_tag()))

    @staticmethod
    def convert(run: str) -> None:
        """Make RUN's latest checkpoint loadable on any number of ranks (DeepSpeed universal checkpoint).

        Args:
          run: the run directory (npp train --out)
        """
        from npp.pipeline.inputs import check_run_checkpoint

        check_run_checkpoint(run)
        from npp.train.universal import convert

        convert(str(run))


@documented
@dataclass
class SampleCommand(SampleConfig, Command):
    """Class-balanced guided samples of a checkpoint (.npz + PNG grid); reruns resume."""

    subcommands = ("check",)

    def plan(self) -> SampleConfig:
        self.validate()
        return self

    def execute(self, plan: SampleConfig) -> None:
        from npp.eval.sample import sample

        sample(plan)

    def check(self) -> None:
        """Check the flags and inputs as a run would (no torch, nothing written): the first step of `make sample`
        and the login-node check of `make sample-slurm` and of slurm/sample.sbatch."""
        self.plan()
        print(f"npp sample: ok ({self.ckpt} -> {self.out})")


@documented
@dataclass
class WatchCommand(WatchConfig, Command):
    """Evaluate each new checkpoint of --run once (FID & co at its step, in its MLflow run); resumable."""

    def plan(self) -> WatchConfig:
        self.validate()
        return self

    def execute(self, plan: WatchConfig) -> None:
        from npp.eval.watch import watch

        watch(plan)


@documented
@dataclass
class DemoCommand(DemoConfig, Command):
    """The whole pipeline on the built-in toy dataset (CPU, 2 DeepSpeed processes); `npp demo compare` trains
    the next-token baseline beside it."""

    subcommands = ("compare",)

    def plan(self) -> DemoConfig:
        self.validate()
        return self

    def execute(self, plan: DemoConfig) -> None:
        from npp.app.demo import demo

        demo(plan)

    def compare(self) -> None:
        """Train NTP (1:1) and NPP on the toy set with the same samples, evaluate both, compare."""
        from npp.app.demo import demo_compare

        demo_compare(self.plan())


class EvalCommands:
    """npp eval --samples S.npz --ref R.npz ... | npp eval ref ... | npp eval fit-classifier ... | npp eval watch ..."""

    watch = WatchCommand
    subcommands = ("watch", "ref", "fit_classifier")

    def __call__(self, samples: str, ref: str, run_id: str = "", ckpt: str = "", inception: str = "",
                 classifier: str = "", experiment: str = "npp", log: bool = True) -> None:
        """Metrics of samples (a file, a comma list or a glob: a cfg sweep) against a reference; logs to MLflow.

        Args:
          samples: samples .npz (from npp sample): a file, a comma list or a glob
          ref: reference batch (ADM's VIRTUAL_imagenet256_labeled.npz) or statistics from `npp eval ref`
          run_id: the MLflow run to log into (default: the run of --ckpt)
          ckpt: the model the samples came from (finds its training run)
          inception: FID Inception weights (pt_inception-2015-12-05-6726825d.pth)
          classifier: or a toy classifier (npp eval fit-classifier) as the feature network
          experiment: MLflow experiment
          log: log the metrics to MLflow (--nolog: print only)
        """
        from npp.pipeline.inputs import check_file, check_gpt_checkpoint, check_samples

        check_samples(samples)
        check_file(ref, "--ref", "a reference batch or statistics (.npz)", "ADM's VIRTUAL_imagenet256_labeled.npz "
                   "(`make assets` downloads it into ckpts/), or `npp eval ref` writes statistics")
        if ckpt:
            check_gpt_checkpoint(ckpt)
        if inception:
            check_file(inception, "--inception", "the FID Inception weights",
                       "`make assets` downloads pt_inception-2015-12-05-6726825d.pth into ckpts/")
        from npp.eval.evaluate import evaluate

        evaluate(str(samples), str(ref), str(run_id) or None, str(ckpt) or None, str(inception) or None,
                 str(classifier) or None, str(experiment), log)

    @staticmethod
    def ref(out: str, data: str = "", shards: str = "", image_size: int = 0, inception: str = "", classifier: str = "",
            limit: int = 50_000, max_features: int = 10000) -> None:
        """Reference statistics from real images (--data), or from the images a shard set was made from (--shards).

        At most --limit images (a seeded subset; ADM's reference batches hold 50,000; 0 = all), streamed
        through the feature network batch by batch.

        Args:
          out: the statistics file to write (.npz)
          data: real images (ImageFolder or parquet)
          shards: or the shard set whose source images to use
          image_size: pixels (default: the shard set's)
          inception: FID Inception weights
          classifier: or a toy classifier as the feature network
          limit: images used (0 = all)
          max_features: features kept for precision/recall
        """
        from npp.eval.features import load_feature_net
        from npp.eval.reference import iter_real_images, make_reference

        net = load_feature_net(str(inception) or None, str(classifier) or None)
        batches, source = iter_real_images(str(data) or None, str(shards) or None, image_size or None, int(limit))
        make_reference(net, batches, str(out), max_features, source)

    @staticmethod
    def fit_classifier(data: str, out: str, image_size: int = 32, epochs: int = 6, batch: int = 64, lr: float = 2e-3,
                       seed: int = 0) -> None:
        """Train the toy classifier that stands in for Inception on datasets like the toy set.

        Args:
          data: ImageFolder directory of labelled images
          out: the classifier checkpoint to write
          image_size: pixels
          epochs: passes over the data
          batch: images per step
          lr: learning rate
          seed: seed of weights and data order
        """
        from npp.eval.fit_classifier import fit_classifier

        fit_classifier(str(data), str(out), image_size, epochs, batch, lr, seed)


@documented
@dataclass
class CompareRunsCommand(CompareRunsConfig, Command):
    """Train, branch, sample and evaluate the fair NPP-vs-NTP experiment for several seeds, then compare (here, or
    as chained SLURM jobs with --slurm); a rerun skips what is done."""

    def plan(self) -> CompareRunsConfig:
        self.validate()
        return self

    def execute(self, plan: CompareRunsConfig) -> None:
        from npp.app.experiment import compare_runs

        compare_runs(plan)


@documented
@dataclass
class ReproduceCommand(ReproduceConfig, Command):
    """A released checkpoint's published FID, measured: fetch, sample with the published settings, evaluate,
    print published against measured (flagged beyond the tolerance); `npp reproduce list` shows the releases."""

    subcommands = ("list",)

    def plan(self) -> ReproduceConfig:
        self.validate()
        return self

    def execute(self, plan: ReproduceConfig) -> None:
        from npp.app.reproduce import reproduce

        reproduce(plan)

    @staticmethod
    def list(table: str = "") -> None:
        """The releases npp reproduces (MODEL, SCHEDULE, published FID and guidance scale, asset, source).

        Args:
          table: a JSON table of releases instead of npp's
        """
        from npp.app.reproduce import release_lines

        print("\n".join(release_lines(str(table))))


class CompareCommands:
    """npp compare [--experiment E ...] | npp compare runs --shards ... (the whole experiment)"""

    runs = CompareRunsCommand
    subcommands = ("runs",)

    def __call__(self, experiment: str = "npp", out: str = "compare", metric: str = "", runs: str = "") -> None:
        """NPP against NTP of the same model, like with like: annealed NTP ends (full runs and branches) as the
        frontier, NPP's cost at its FID and held-out loss, equal-epoch differences, seeds grouped, protocols
        checked: a table, compare.csv, comparison.json and a figure (PNG and PDF).

        Args:
          experiment: MLflow experiment of the runs
          out: directory of the table, the figure and comparison.json
          metric: the FID to compare, as npp or the MLflow UI names it (fid, curve/fid_n200 or Results/fid_n200;
            default: the one with the most annealed ends)
          runs: the runs to compare, comma-separated names or ids (default: every training run of the experiment)
        """
        from npp.eval.compare import compare as run_compare

        run_compare(str(experiment), str(out), str(metric) or None,
                    [r.strip() for r in str(runs).split(",") if r.strip()] or None)


def assets(out: str = "ckpts", only: str = "", manifest: str = "", timeout: float = 60.0,
           progress: bool = True) -> None:
    """Download the files an ImageNet run needs (LlamaGen's VQ tokenizer, ADM's reference batch, the FID Inception
    weights), each checked by size and SHA-256; a rerun continues a partial download and skips valid files.

    Args:
      out: directory the files go to
      only: comma-separated asset names (default: those three; the released GPTs that `npp reproduce` evaluates
        are fetched when named: llamagen_c2i_B_256.pt, npp_c2i_L_256.pt, ...; `npp reproduce list` lists them)
      manifest: JSON {name: {url, sha256, size}} replacing sources (a mirror; NPP_ASSETS_URL sets a base URL)
      timeout: seconds a connection may stay silent
      progress: show a progress bar per file (--noprogress: none)
    """
    from npp.pipeline.assets import fetch_assets

    names = [n.strip() for n in str(only).split(",") if n.strip()] or None
    fetch_assets(str(out), names, str(manifest), float(timeout), bool(progress))


def ui(experiment: str = "npp", host: str = "127.0.0.1", port: int = 5000, serve: bool = True) -> None:
    """Print the URLs of an experiment's training runs in the MLflow UI, then serve the UI for
    MLFLOW_TRACKING_URI (an http:// tracking server already serves it: then only the URLs are printed).

    Args:
      experiment: MLflow experiment
      host: address the UI listens on
      port: port the UI listens on
      serve: serve the UI (--noserve: print the URLs only)
    """
    import shutil

    import mlflow

    from npp.runtime.mlflow_utils import experiment_urls, tracking_uri

    uri = tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    base = uri if remote else f"http://{host}:{port}"
    exp = mlflow.tracking.MlflowClient(uri).get_experiment_by_name(str(experiment))
    if exp is None:
        print(f"no experiment {experiment!r} in {uri} yet (train a run first); the UI opens on {base}")
    else:
        urls = experiment_urls(base, exp.experiment_id)
        print(f"MLflow UI, experiment {experiment!r}:\n  training runs: {urls['runs']}\n"
              f"  charts:        {urls['charts']}  (pick train_pflops or train_hours as the x-axis: FID against "
              "training compute)",
              flush=True)
    if serve and not remote:
        mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
        os.execv(mlflow_bin, [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", str(host), "--port", str(port)])


COMMANDS = {
    "assets": assets,
    "models": models,
    "schedule": schedule,
    "tokenize": {"run": TokenizeCommand, "finalize": finalize, "toy": toy, "fit-vq": fit_vq},
    "train": TrainCommand,
    "sample": SampleCommand,
    "eval": EvalCommands(),
    "compare": CompareCommands(),
    "reproduce": ReproduceCommand,
    "ui": ui,
    "demo": DemoCommand,
}


def _member(obj: Any, name: str) -> Any:
    """The subcommand `name` of a command table entry, or None (internal methods are not commands)."""
    key = name.replace("-", "_")
    if isinstance(obj, dict):
        return obj.get(name, obj.get(key))
    if name.startswith("_") or key not in getattr(obj, "subcommands", ()):
        return None
    return getattr(obj, key, None)


def resolve(argv: list[str]) -> tuple[list[str], Any, int]:
    """The command words, the object they reach in COMMANDS, and the index of the first flag."""
    obj: Any = COMMANDS
    words: list[str] = []
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        nxt = _member(obj, argv[i])
        if nxt is None:
            if hasattr(obj, "subcommands") and hasattr(obj, argv[i].replace("-", "_")):  # a method, not a command
                raise UsageError(f"{' '.join(['npp', *words])} has no command {argv[i]!r} (commands: "
                                 f"{', '.join(c.replace('_', '-') for c in obj.subcommands) or 'none'})")
            if isinstance(obj, dict):
                close = difflib.get_close_matches(argv[i], list(obj), n=1)
                hint = f"; did you mean {' '.join(['npp', *words, close[0]])}?" if close else ""
                raise UsageError(f"unknown command {' '.join(['npp', *words, argv[i]])}{hint} (commands: "
                                 f"{', '.join(obj)})")
            break
        words.append(argv[i])
        obj, i = nxt, i + 1
    return words, obj, i


def _flag_sources(parent: Any, obj: Any) -> list:
    """What declares a command's flags: the command class or function itself; for one of a command class's
    instance methods (`npp demo compare`, `npp train check`), the class's fields and the method's parameters."""
    if isinstance(obj, dict):
        return []
    if isinstance(obj, (EvalCommands, CompareCommands)):
        return [obj.__call__]
    if inspect.isfunction(obj) and inspect.isclass(parent) and "self" in inspect.signature(obj).parameters:
        return [parent, obj]
    return [obj]


def _command(argv: list[str]) -> tuple[list[str], Any, list, int]:
    """The command words, what they reach, what declares its flags, and the index of its first flag."""
    words, obj, start = resolve(argv)
    parent: Any = COMMANDS
    for w in words[:-1]:
        parent = _member(parent, w)
    return words, obj, _flag_sources(parent if words else None, obj), start


def help_text(argv: list[str]) -> str:
    """`npp ... --help` (or `-h`, or after `--` as fire's hint spells it): rendered from the declarations the
    flags are read against (npp.app.help), not by fire."""
    words, obj, sources, _ = _command([a for a in argv if a not in (*HELP_WORDS, "--")])
    return render_help(words, obj, sources, _member)


def normalize_argv(argv: list[str]) -> list[str]:
    """The command line with every flag checked against its declared type (npp.runtime.flags) and
    rewritten as the exact Python literal fire reads back; fire's own flags (after `--`) pass as they are.
    HelpRequested: no command, a help word among the flags (npp.runtime.flags.parse_flags) or after `--`
    (fire's own hint: `npp train -- --help`), or a group of commands without one of them."""
    own = argv.index("--") if "--" in argv else len(argv)
    if not argv or any(a in HELP_WORDS for a in argv[own + 1:]):
        raise HelpRequested
    words, obj, sources, start = _command(argv[:own])
    if not sources:  # a group of commands (`npp tokenize`): what it holds
        raise HelpRequested
    values = parse_flags(sources, argv[start:own], " ".join(["npp", *words]))
    return words + as_fire_args(values) + argv[own:]


def version() -> str:
    from npp.runtime.files import npp_version

    return f"npp {npp_version()}"


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand; user errors print one clear line and exit 2 (NPP_DEBUG=1 shows the traceback).

    Only the project's own error types (and a missing file) count as user errors: any
    other exception is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"], ["version"]):
        print(version())
        return
    try:
        try:
            argv = normalize_argv(argv)
        except HelpRequested:
            print(help_text(argv), end="")
            return
        fire.Fire(COMMANDS, command=argv, name="npp", serialize=run_command)
    except (NppError, FileNotFoundError) as e:
        if environment.debug():
            raise
        # an error every rank of a job raises alike (a flag, a failed save) is said once, by rank 0
        said_by_all = isinstance(e, UsageError) or getattr(e, "all_ranks", False)
        if not said_by_all or is_rank_zero():
            print(f"npp: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
