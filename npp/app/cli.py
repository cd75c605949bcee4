"""The `npp` command: every command is a stage's config (a frozen dataclass beside its stage, torch-free: its
fields are the flags, each with one name, one default and one meaning), made a command here by an `execute`.

The command line is read once, against those declarations (npp.runtime.flags); fire then builds the command
from the typed values (docs/architecture.md says why fire stays, and its one read-back), `run_command` makes its
plan (`plan()`: every check, and what the stage runs, resolved) and executes it. The command table is built
without importing torch: a wrong flag fails in a fraction of a second; each stage's implementation is imported
when its command runs. This package (npp.app) is the only one that imports more than one stage.
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
from typing import Any  # noqa: E402

import fire  # noqa: E402

from npp.app.demo import DemoConfig  # noqa: E402
from npp.app.experiment import CompareRunsConfig  # noqa: E402
from npp.app.help import render as render_help  # noqa: E402
from npp.app.reproduce import ReleasesConfig, ReproduceConfig  # noqa: E402
from npp.app.ui import UiConfig  # noqa: E402
from npp.errors import NppError, UsageError  # noqa: E402
from npp.eval.config import (  # noqa: E402
    CompareConfig,
    EvalConfig,
    FitClassifierConfig,
    RefConfig,
    SampleConfig,
    WatchConfig,
)
from npp.pipeline.assets import AssetsConfig  # noqa: E402
from npp.runtime import environment  # noqa: E402
from npp.runtime.flags import HELP_WORDS, HelpRequested, as_fire_args, documented, parse_flags  # noqa: E402
from npp.runtime.ranks import is_rank_zero  # noqa: E402
from npp.tokenize.config import FinalizeConfig, FitVQConfig, TokenizeConfig, ToyConfig  # noqa: E402
from npp.train.config import (  # noqa: E402
    BranchConfig,
    ConvertConfig,
    ExportConfig,
    ModelsConfig,
    ScheduleConfig,
    TrainConfig,
)


class Command:
    """A stage's config that is also a command: fire builds it from the flags, `run_command` makes its plan (the
    config's `plan()`: every check, and what the stage runs, resolved and frozen) and executes that plan; nothing
    after `plan()` checks a flag again. `subcommands` maps the words that reach a subcommand to a command class
    (`npp train export`) or to the name of a method run on this command's flags (`npp train check`); no other
    member is one."""

    subcommands: dict = {}

    def execute(self, plan: Any) -> None:  # not `run`: a config may have a field of that name (eval watch --run)
        raise NotImplementedError


def run_command(result: Any) -> Any:
    """fire's `serialize` hook: run the command fire built (a Command); anything else passes through."""
    if isinstance(result, Command):
        result.execute(result.plan())
        return None
    return result


@documented
class ModelsCommand(ModelsConfig, Command):
    """List the model sizes with their parameter counts."""

    def execute(self, plan: ModelsConfig) -> None:
        from npp.models.configs import GPT_SIZES, count_parameters, gpt_config

        print(f"{'name':<10} {'layers':>6} {'heads':>5} {'dim':>5} {'params':>15}")
        for name, (layers, heads, dim) in GPT_SIZES.items():
            cfg = gpt_config(name, vocab_size=plan.vocab_size, num_classes=plan.num_classes,
                             block_size=plan.block_size)
            print(f"{name:<10} {layers:>6} {heads:>5} {dim:>5} {count_parameters(cfg):>15,}")


@documented
class ScheduleCommand(ScheduleConfig, Command):
    """Show where each stage of a schedule starts and ends, and its cost relative to next-token training.

    Give `--schedule 4:0.25,2:0.25,1:0.5`, or the paper's `--patch-levels 3 --epoch-rate 0.5`.
    """

    def execute(self, plan) -> None:
        sched, spe = plan.schedule, plan.steps_per_epoch
        for span, flops in zip(sched.spans, sched.flops_per_sample(plan.model_cfg), strict=False):
            print(f"stage {span.index}: k={span.patch_side} steps [{span.start}, {span.end}) "
                  f"epochs [{span.start / spe:g}, {span.end / spe:g}) {flops / 1e9:.1f} GFLOP/sample")
        ratio = sched.cost_ratio(plan.model_cfg)
        print(f"training cost vs next-token prediction ({plan.model}): {ratio:.4f}")
        if len(sched.stages) > 1:  # the NTP run of the same training FLOPs: the branch `npp compare` needs beside it
            epochs = plan.epochs * ratio
            print(f"compute-matched NTP budget: {epochs:.2f} epochs (an NTP run with --branch-epochs "
                  f"{round(epochs)}, then `npp train branch --epochs {round(epochs)}`)")


@documented
class ToyCommand(ToyConfig, Command):
    """Render the built-in toy dataset (10 classes of shapes and patterns) as an ImageFolder tree."""

    def execute(self, plan: ToyConfig) -> None:
        from npp.pipeline.toy import write_toy_dataset

        n = write_toy_dataset(plan.out, plan.per_class, plan.size, plan.seed)
        print(f"toy dataset in {plan.out}: {n} new images")


@documented
class FitVQCommand(FitVQConfig, Command):
    """Fit a small VQ tokenizer on a folder of images; writes a LlamaGen-format checkpoint and a PNG.

    The budget is --max-steps; --minutes > 0 adds a wall-clock cap (then the result depends on the machine).
    """

    def execute(self, plan: FitVQConfig) -> None:
        from npp.tokenize.fit_vq import fit_vq

        fit_vq(plan)


@documented
class FinalizeCommand(FinalizeConfig, Command):
    """Merge every rank's shards into manifest.parquet and failures.parquet."""

    def execute(self, plan: FinalizeConfig) -> None:
        from npp.tokenize.run import finalize

        finalize(plan.out)


@documented
class TokenizeCommand(TokenizeConfig, Command):
    """Encode images (ImageFolder or parquet) into VQ-code shards; reruns resume."""

    subcommands = {"check": "check"}

    def execute(self, plan: TokenizeConfig) -> None:
        from npp.tokenize.run import tokenize

        tokenize(plan)

    def check(self) -> None:
        """Check the flags and inputs as a run would (no torch, nothing written): the login-node check of
        `make tokenize-slurm` and of slurm/tokenize.sbatch."""
        plan = self.plan()
        print(f"npp tokenize run: ok ({plan.data} -> {plan.out})")


def _train(plan) -> None:
    from npp.app.training import train_with_evaluation

    train_with_evaluation(plan)


@documented
class BranchCommand(BranchConfig, Command):
    """Train the E-epoch run that a longer single-stage run (started with --branch-epochs E) holds until its decay:
    from that run's checkpoint at the branch point, only the decay (the compute-matched NTP baseline, a fifth of
    its cost). Run it as `npp train` runs, under torchrun or srun, on the parent's number of ranks; a rerun
    resumes it."""

    def execute(self, plan) -> None:
        if self.check:  # the command's mode (check only, as `npp train check`), not a setting of the run planned
            print(f"npp train branch: ok: {plan.describe()}; from {plan.branch['parent']} at step "
                  f"{plan.branch['step']}")
            return
        _train(plan)


@documented
class ExportCommand(ExportConfig, Command):
    """Write the consolidated fp32 checkpoint (LlamaGen format) of a run's latest (or --tag) checkpoint."""

    def execute(self, plan: ExportConfig) -> None:
        from npp.pipeline.runs import RunFolder, tag_step
        from npp.train.export import export
        from npp.train.tracking import tag_exported_model

        path = export(plan.run, plan.tag or None, plan.out or None)
        folder = RunFolder(plan.run)
        tag_exported_model(folder, path, tag_step(plan.tag or folder.latest_tag()))


@documented
class ConvertCommand(ConvertConfig, Command):
    """Make RUN's latest checkpoint loadable on any number of ranks (DeepSpeed universal checkpoint)."""

    def execute(self, plan: ConvertConfig) -> None:
        from npp.train.universal import convert

        convert(plan.run)


@documented
class TrainCommand(TrainConfig, Command):
    """Train a GPT on a shard set with DeepSpeed and the NPP patch schedule (resumes from --out).

    `npp train export --run RUN` writes the consolidated model; `npp train convert --run RUN` makes the latest
    checkpoint loadable on any number of ranks; `npp train check ...` checks a run's flags and inputs without
    starting it.
    """

    subcommands = {"export": ExportCommand, "convert": ConvertCommand, "check": "check", "branch": BranchCommand}

    def execute(self, plan) -> None:
        _train(plan)

    def check(self, world_size: int = 0) -> None:
        """Check the flags and inputs of a run as its start would (no torch, nothing written), for a job of
        --world-size ranks (default: this one's): the login-node check of `make train`, `make train-slurm` and of
        slurm/train.sbatch. Prints the plan.

        Args:
          world_size: the job's number of ranks (0: this process's WORLD_SIZE, else 1)
        """
        plan = self.plan(world_size or None)
        print(f"npp train: ok: {plan.describe()}")
        for note in plan.notes:
            print(f"npp train: note: {note}")
        if plan.changes:
            from npp.train.run_record import describe_changes

            print(f"npp train: {describe_changes(plan)}")


@documented
class SampleCommand(SampleConfig, Command):
    """Class-balanced guided samples of a checkpoint (.npz + PNG grid); reruns resume."""

    subcommands = {"check": "check"}

    def execute(self, plan: SampleConfig) -> None:
        from npp.eval.sample import sample

        sample(plan)

    def check(self) -> None:
        """Check the flags and inputs as a run would (no torch, nothing written): the first step of `make sample`
        and the login-node check of `make sample-slurm` and of slurm/sample.sbatch."""
        plan = self.plan()
        print(f"npp sample: ok ({plan.ckpt} -> {plan.out})")


@documented
class WatchCommand(WatchConfig, Command):
    """Evaluate each new checkpoint of --run once (FID & co at its step, in its MLflow run); resumable."""

    def execute(self, plan: WatchConfig) -> None:
        from npp.eval.watch import watch

        watch(plan)


@documented
class RefCommand(RefConfig, Command):
    """Reference statistics from real images (--data), or from the images a shard set was made from (--shards).

    At most --limit images (a seeded subset; ADM's reference batches hold 50,000; 0 = all), streamed through the
    feature network batch by batch.
    """

    def execute(self, plan: RefConfig) -> None:
        from npp.eval.features import load_feature_net
        from npp.eval.reference import iter_real_images, make_reference

        net = load_feature_net(plan.inception or None, plan.classifier or None)
        batches, source = iter_real_images(plan.data or None, plan.shards or None, plan.image_size or None,
                                           plan.limit)
        make_reference(net, batches, plan.out, plan.max_features, source)


@documented
class FitClassifierCommand(FitClassifierConfig, Command):
    """Train the toy classifier that stands in for Inception on datasets like the toy set."""

    def execute(self, plan: FitClassifierConfig) -> None:
        from npp.eval.fit_classifier import fit_classifier

        fit_classifier(plan)


@documented
class EvalCommand(EvalConfig, Command):
    """Metrics of samples (a file, a comma list or a glob: a cfg sweep) against a reference; logs to MLflow.

    `npp eval ref` makes reference statistics, `npp eval fit-classifier` the toy feature network, `npp eval watch`
    evaluates a run's checkpoints as they come.
    """

    subcommands = {"watch": WatchCommand, "ref": RefCommand, "fit_classifier": FitClassifierCommand}

    def execute(self, plan: EvalConfig) -> None:
        from npp.eval.evaluate import evaluate

        evaluate(plan.samples, plan.ref, plan.run_id or None, plan.ckpt or None, plan.inception or None,
                 plan.classifier or None, plan.experiment, plan.log)


@documented
class DemoCommand(DemoConfig, Command):
    """The whole pipeline on the built-in toy dataset (CPU, 2 DeepSpeed processes); `npp demo compare` trains
    the next-token baseline beside it."""

    subcommands = {"compare": "compare"}

    def execute(self, plan: DemoConfig) -> None:
        from npp.app.demo import demo

        demo(plan)

    def compare(self) -> None:
        """Train NTP (1:1) and NPP on the toy set with the same samples, evaluate both, compare."""
        from npp.app.demo import demo_compare

        demo_compare(self.plan())


@documented
class CompareRunsCommand(CompareRunsConfig, Command):
    """Train, branch, sample and evaluate the fair NPP-vs-NTP experiment for several seeds, then compare (here, or
    as chained SLURM jobs with --slurm); a rerun skips what is done."""

    def execute(self, plan: CompareRunsConfig) -> None:
        from npp.app.experiment import compare_runs

        compare_runs(plan)


@documented
class CompareCommand(CompareConfig, Command):
    """NPP against NTP of the same model, like with like: annealed NTP ends (full runs and branches) as the
    frontier, NPP's cost at its FID and held-out loss, equal-epoch differences, seeds grouped, protocols checked: a
    table, compare.csv, comparison.json and a figure (PNG and PDF).

    `npp compare runs --shards ...` runs the whole experiment first.
    """

    subcommands = {"runs": CompareRunsCommand}

    def execute(self, plan: CompareConfig) -> None:
        from npp.eval.compare import compare

        compare(plan.experiment, plan.out, plan.metric or None, plan.run_list())


@documented
class ReleasesCommand(ReleasesConfig, Command):
    """The releases npp reproduces (MODEL, SCHEDULE, published FID and guidance scale, asset, source)."""

    def execute(self, plan: ReleasesConfig) -> None:
        from npp.app.reproduce import release_lines

        print("\n".join(release_lines(plan.table)))


@documented
class ReproduceCommand(ReproduceConfig, Command):
    """A released checkpoint's published FID, measured: fetch, sample with the published settings, evaluate,
    print published against measured (flagged beyond the tolerance); `npp reproduce list` shows the releases."""

    subcommands = {"list": ReleasesCommand}

    def execute(self, plan: ReproduceConfig) -> None:
        from npp.app.reproduce import reproduce

        reproduce(plan)


@documented
class AssetsCommand(AssetsConfig, Command):
    """Download the files an ImageNet run needs (LlamaGen's VQ tokenizer, ADM's reference batch, the FID Inception
    weights), each checked by size and SHA-256; a rerun continues a partial download and skips valid files."""

    def execute(self, plan: AssetsConfig) -> None:
        from npp.pipeline.assets import fetch_assets

        fetch_assets(plan.out, plan.names(), plan.manifest, plan.timeout, plan.progress)


@documented
class UiCommand(UiConfig, Command):
    """Print the URLs of an experiment's training runs in the MLflow UI, then serve the UI for MLFLOW_TRACKING_URI
    (an http:// tracking server already serves it: then only the URLs are printed)."""

    def execute(self, plan: UiConfig) -> None:
        from npp.app.ui import open_ui

        open_ui(plan)


COMMANDS = {
    "assets": AssetsCommand,
    "models": ModelsCommand,
    "schedule": ScheduleCommand,
    "tokenize": {"run": TokenizeCommand, "finalize": FinalizeCommand, "toy": ToyCommand, "fit-vq": FitVQCommand},
    "train": TrainCommand,
    "sample": SampleCommand,
    "eval": EvalCommand,
    "compare": CompareCommand,
    "reproduce": ReproduceCommand,
    "ui": UiCommand,
    "demo": DemoCommand,
}


def _member(obj: Any, name: str) -> Any:
    """The subcommand `name` of a command table entry, or None (internal methods are not commands)."""
    key = name.replace("-", "_")
    if isinstance(obj, dict):  # the table's words are dashed (fit-vq); fit_vq reaches it too, as a class's do
        return obj.get(name, obj.get(name.replace("_", "-")))
    target = getattr(obj, "subcommands", {}).get(key)
    return getattr(obj, target) if isinstance(target, str) else target


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
            names = [c.replace("_", "-") for c in getattr(obj, "subcommands", {})]
            close = difflib.get_close_matches(argv[i], names, n=1, cutoff=0.75)
            if close and not any(c in argv[i] for c in "/.~"):  # a misspelt subcommand, not a positional value
                raise UsageError(f"unknown command {' '.join(['npp', *words, argv[i]])}; did you mean "
                                 f"{' '.join(['npp', *words, close[0]])}? (commands: {', '.join(names)})")
            break
        words.append(argv[i])
        obj, i = nxt, i + 1
    return words, obj, i


def _flag_sources(parent: Any, obj: Any) -> list:
    """What declares a command's flags: the command class or function itself; for one of a command class's
    instance methods (`npp demo compare`, `npp train check`), the class's fields and the method's parameters."""
    if isinstance(obj, dict):
        return []
    if inspect.isfunction(obj) and inspect.isclass(parent) and "self" in inspect.signature(obj).parameters:
        return [parent, obj]
    return [obj]


def _parent(words: list[str]) -> Any:
    """What holds the command the words reach (the command class of a method subcommand: `npp train check`)."""
    parent: Any = COMMANDS
    for w in words[:-1]:
        parent = _member(parent, w)
    return parent


def _command(argv: list[str]) -> tuple[list[str], Any, list, int]:
    """The command words, what they reach, what declares its flags, and the index of its first flag."""
    words, obj, start = resolve(argv)
    return words, obj, _flag_sources(_parent(words) if words else None, obj), start


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
        words, target, start = resolve(argv)
        name = " ".join(["npp", *words])
        if inspect.isfunction(target):  # a method run on its command's flags: fire builds the command, then calls it
            fire.Fire(_parent(words), command=[words[-1].replace("-", "_"), *argv[start:]], name=name,
                      serialize=run_command)
        else:
            fire.Fire(target, command=argv[start:], name=name, serialize=run_command)
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
