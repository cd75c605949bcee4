"""`npp demo`: the whole pipeline on the built-in toy dataset, through the same code as an ImageNet run.

toy images → fit a small VQ → tokenize to shards → fit the toy classifier and the
reference statistics → train NPP with DeepSpeed (2 processes, torchrun) → sample
(class-balanced, guided) → eval → MLflow. Each step is skipped when its output is
already there, so a rerun reuses the toy set, the tokenizer, the shards, the
classifier and the reference. Part of the application (npp.app): it wires stages
together; no stage imports another.

`npp demo compare` is `npp compare runs` on the toy set with one seed: the next-token baseline
(`1:1`) of the same epochs beside NPP, with a branch at NPP's training FLOPs (the annealed NTP run
of that budget, for a fifth of its cost), every end evaluated alike, then `npp compare`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from npp.app.launch import torchrun_train_cmd
from npp.errors import NppError, UsageError
from npp.pipeline.runs import RunFolder
from npp.runtime.flags import Checked, documented, flag
from npp.train.config import DEFAULT_DS_CONFIG, DEFAULT_SCHEDULE


class DemoError(NppError, RuntimeError):
    """A demo step that failed; the message says how to go on."""


def find_ds_config(path: str) -> Path:
    """A DeepSpeed config given relative to the working directory, or to the source checkout (ds_configs/ is part
    of the repository, not of an installed package): npp.train.ds_config's rule."""
    from npp.train.ds_config import load_ds_json, resolve_ds_path

    resolved = resolve_ds_path(path)
    load_ds_json(resolved)  # exists, is a file, is JSON
    return Path(resolved).resolve()


@documented
@dataclass(frozen=True)
class DemoConfig(Checked):
    """The flags of `npp demo` (and `npp demo compare`)."""

    out: str = flag("demo_out", "directory of everything the demo makes (a rerun reuses what is there)")
    per_class: int = flag(1000, "toy images per class (10 classes): fewer and the tiny GPT memorises")
    image_size: int = flag(32, "pixels of the toy images")
    vq_steps: int = flag(700, "steps of the VQ fit (a step budget, never wall-clock: the same numbers anywhere)")
    classifier_epochs: int = flag(2, "epochs of the toy classifier that stands in for Inception")
    model: str = flag("GPT-Nano", "model size (on a CPU GPT-Nano classified better than GPT-Tiny for the same "
                                  "seconds of training: docs/reference.md has the trials)")
    schedule: str = flag(DEFAULT_SCHEDULE, "the NPP schedule (`npp demo compare` adds 1:1 beside it)")
    epochs: int = flag(32, "training epochs")
    global_batch: int = flag(32, "samples per optimizer step (more updates per epoch learn faster here)")
    lr: float = flag(1e-2, "peak learning rate (a 64-wide model takes a high one)")
    end_lr: float = flag(1e-4, "learning rate at the end of each stage")
    warmup_epochs: float = flag(0.25, "linear warmup at the start of every stage, in epochs (a short run spends "
                                      "little of each stage warming up)")
    dropout: float = flag(0.0, "token/residual/FFN/attention dropout (a tiny model on a tiny set underfits)")
    nproc: int = flag(2, "DeepSpeed processes (torchrun, gloo on CPU)")
    ds_config: str = flag(DEFAULT_DS_CONFIG, "DeepSpeed JSON")
    samples_per_class: int = flag(50, "samples per class for the final evaluation")
    eval_points: int = flag(5, "FID evaluations during training (a curve against FLOPs)")
    eval_per_class: int = flag(20, "samples per class at each eval point")
    cfg_scale: float = flag(2.0, "guidance scale (a tiny model's unconditional half is weak: mild guidance)")
    top_k: int = flag(0, "top-k sampling (0 = all)")
    temperature: float = flag(0.6, "sampling temperature (cooler samples best on the toy set)")
    seed: int = flag(0, "seed of everything")
    seeds: str = flag("", "`npp demo compare`: seeds, e.g. 0,1,2 (default: --seed alone)")
    schedules: str = flag("", "`npp demo compare`: NPP schedules separated by ';' (default: --schedule)")
    branch_epochs: str = flag("", "`npp demo compare`: NTP budgets branched off the NTP run (default: the "
                                  "compute-matched epochs of each schedule)")
    val_share: float = flag(0.02, "share of the toy images held out of training (the held-out loss val/loss_k1)")
    check_quality: bool = flag(True, "fail unless samples show learning (>= --min-class-accuracy classified)")
    min_class_accuracy: float = flag(0.8, "share of samples the classifier must put in their class")

    def validate(self) -> None:
        """Refuse values that cannot work before anything is built (no torch)."""
        from npp.models.configs import GPT_SIZES
        from npp.train.schedule import parse_schedule

        for name in ("per_class", "image_size", "vq_steps", "classifier_epochs", "epochs", "global_batch", "nproc",
                     "samples_per_class", "eval_per_class"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.model not in GPT_SIZES:
            raise UsageError(f"--model {self.model!r} is not a model size: one of {', '.join(GPT_SIZES)}")
        if not self.warmup_epochs >= 0:
            raise UsageError(f"--warmup-epochs must be at least 0, got {self.warmup_epochs}")
        if not 0 <= self.dropout < 1 or not 0 <= self.min_class_accuracy <= 1 or self.temperature <= 0:
            raise UsageError("--dropout must lie in [0, 1), --min-class-accuracy in [0, 1], --temperature > 0")
        parse_schedule(self.schedule)
        find_ds_config(self.ds_config)


def check_before_launch(run: Path, flags: dict, nproc: int) -> None:
    """`npp train`'s own check of the run's flags (no torch), here rather than after torchrun: a demo_out trained
    by an earlier `npp demo` with other defaults is refused with the fix in one line, not with the launcher's
    traceback and a "rerun to resume it" that would fail the same way."""
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan

    try:
        make_plan(TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}), nproc)
    except UsageError as e:
        raise DemoError(f"{e}. For the demo: remove {run} to train it anew with this demo's settings, or pass "
                        "--out another folder") from None


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.images = self.out / "data" / "toy"
        self.vq = self.out / "vq_toy.pt"
        self.shards = self.out / "shards"
        self.classifier = self.out / "toynet.pt"
        self.ref = self.out / "ref_toynet.npz"
        self.mlflow_uri = f"sqlite:///{self.out / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        # artifacts under the demo's directory (a sqlite store would put them in ./mlruns of the cwd)
        import mlflow

        from npp.runtime.mlflow_utils import mark_training_experiment

        mlflow.set_tracking_uri(self.mlflow_uri)
        mark_training_experiment("npp-demo", artifact_location=(self.out / "mlartifacts").as_uri())
        self.ds_config = find_ds_config(cfg.ds_config)
        self.timings: dict[str, float] = {}

    # --- data, tokenizer, references (reused when present) --------------------------
    def prepare(self) -> None:
        from npp.pipeline.shards import finished_meta
        from npp.pipeline.toy import write_toy_dataset

        c = self.cfg
        t = _step(f"1/6 toy dataset: {c.per_class} images x 10 classes in {self.images}")
        write_toy_dataset(str(self.images), per_class=c.per_class, size=48, seed=c.seed)
        self.timings["toy"] = time.time() - t

        t = _step(f"2/6 tokenizer: fit VQ-toy ({c.vq_steps} steps) -> {self.vq}")
        if self.vq.exists():
            print(f"reusing {self.vq}")
        else:
            from npp.tokenize.config import FitVQConfig
            from npp.tokenize.fit_vq import fit_vq

            fit_vq(FitVQConfig(str(self.images), str(self.vq), image_size=c.image_size, max_steps=c.vq_steps,
                               seed=c.seed).plan())
        self.timings["vq"] = time.time() - t

        t = _step(f"3/6 tokenize -> WebDataset shards in {self.shards}")
        meta = finished_meta(self.shards)
        if meta:
            print(f"reusing {self.shards} ({meta['samples']} samples)")
        else:
            from npp.tokenize.run import TokenizeConfig, tokenize

            tokenize(TokenizeConfig(data=str(self.images), vq=str(self.vq), out=str(self.shards),
                                    image_size=c.image_size, samples_per_shard=100, batch=64, workers=1,
                                    val_share=c.val_share, seed=c.seed).plan())
        self.timings["tokenize"] = time.time() - t

        t = _step("4/6 toy classifier and reference statistics (stand-in for Inception)")
        if self.classifier.exists():
            print(f"reusing {self.classifier}")
        else:
            from npp.eval.config import FitClassifierConfig
            from npp.eval.fit_classifier import fit_classifier

            fit_classifier(FitClassifierConfig(str(self.images), str(self.classifier), image_size=c.image_size,
                                               epochs=c.classifier_epochs, seed=c.seed).plan())
        if self.ref.exists():
            print(f"reusing {self.ref}")
        else:
            from npp.eval.features import load_feature_net
            from npp.eval.reference import make_reference, real_images

            net = load_feature_net(classifier=str(self.classifier))
            images, source = real_images(str(self.images), None, c.image_size)
            make_reference(net, images, str(self.ref), source=source)
        self.timings["classifier+ref"] = time.time() - t

    # --- training through torchrun + DeepSpeed, exactly as on a cluster -------------
    def recipe(self) -> dict:
        """The `npp train` flags of every demo run beside its data, run folder, schedule and seed."""
        c = self.cfg
        return {
            "global_batch": c.global_batch, "lr": c.lr, "end_lr": c.end_lr, "warmup_epochs": c.warmup_epochs,
            "ds_config": self.ds_config, "workers": 1, "log_every": 50, "ckpt_every": 500,
            "eval_every_epochs": c.epochs / max(1, c.eval_points), "eval_per_class": c.eval_per_class,
            "eval_cfg_scale": c.cfg_scale, "eval_temperature": c.temperature, "eval_top_k": c.top_k, "eval_batch": 100,
            "vq": self.vq, "eval_ref": self.ref, "classifier": self.classifier,
            "token_dropout": c.dropout, "resid_dropout": c.dropout, "ffn_dropout": c.dropout, "attn_dropout": c.dropout,
        }

    def env(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.cfg.nproc)),
                "PYTHONUNBUFFERED": "1"}

    def train(self, name: str, schedule: str) -> Path:
        c = self.cfg
        run = self.out / "runs" / name
        t = _step(f"5/6 train {c.model} with schedule {schedule} on {c.nproc} DeepSpeed processes -> {run}")
        flags = {"shards": self.shards, "out": run, "model": c.model, "schedule": schedule, "epochs": c.epochs,
                 **self.recipe(), "seed": c.seed, "experiment": "npp-demo", "run_name": name}
        check_before_launch(run, flags, c.nproc)
        cmd = torchrun_train_cmd(c.nproc, flags)
        proc = subprocess.run(cmd, env=self.env())
        if proc.returncode != 0:
            raise DemoError(f"training {name} failed (exit {proc.returncode}); rerun `make demo` to resume it")
        self.timings[f"train {name}"] = time.time() - t
        return run

    # --- sampling and evaluation ---------------------------------------------------------
    def sample_and_eval(self, ckpt: Path, out: Path, log: bool) -> dict:
        from npp.eval.evaluate import evaluate
        from npp.eval.sample import SampleConfig, sample, samples_path

        c = self.cfg
        sample(SampleConfig(ckpt=str(ckpt), vq=str(self.vq), out=str(out), per_class=c.samples_per_class,
                            cfg_scale=c.cfg_scale, batch=100, top_k=c.top_k, temperature=c.temperature, seed=c.seed))
        path = samples_path(out, c.cfg_scale)
        metrics = evaluate(str(path), str(self.ref), ckpt=str(ckpt), classifier=str(self.classifier),
                           experiment="npp-demo", log=log)[str(path)]
        return {"metrics": metrics, "samples": str(path), "grid": str(path.with_suffix(".png"))}

    def untrained_baseline(self, run: Path) -> dict:
        """The same architecture with its initial weights, sampled and scored the same way."""
        import torch

        from npp.models.configs import GPTConfig
        from npp.models.gpt import GPT

        ckpt = self.out / "untrained" / "model.pt"
        if not ckpt.exists():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            config = GPTConfig.from_dict(RunFolder(run).read_config()["model_config"])
            torch.manual_seed(self.cfg.seed)
            torch.save({"model": GPT(config).state_dict(), "config": config.to_dict(), "steps": 0}, ckpt)
        return self.sample_and_eval(ckpt, ckpt.parent / "samples", log=False)

    def run(self) -> dict:
        start = time.time()
        self.prepare()
        run = self.train("npp", self.cfg.schedule)
        t = _step("6/6 sample (class-balanced, guided) and evaluate")
        trained = self.sample_and_eval(RunFolder(run).model, run / "samples", log=True)
        untrained = self.untrained_baseline(run)
        self.timings["sample+eval"] = time.time() - t
        result = {"trained": trained, "untrained": untrained, "run": str(run), "seconds": time.time() - start}
        (self.out / "demo_result.json").write_text(json.dumps({**result, "timings": self.timings}, indent=2))
        self.report(result)
        return result

    def report(self, result: dict) -> None:
        m, u = result["trained"]["metrics"], result["untrained"]["metrics"]
        acc, fid, fid0 = m["class_accuracy_toynet"], m["fid_toynet"], u["fid_toynet"]
        print("\n=== demo result")
        for k in m:
            print(f"  {k:<24} trained {m[k]:9.4f}   untrained {u[k]:9.4f}")
        print(
            f"  time: {result['seconds'] / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in self.timings.items())})"
        )
        print(f"\n  sample grid:  {result['trained']['grid']}")
        print(f"  checkpoint:   {RunFolder(result['run']).model}")
        print(f"  MLflow store: {self.mlflow_uri}")
        print(f"  MLflow UI:    make ui MLFLOW_TRACKING_URI={self.mlflow_uri} EXPERIMENT=npp-demo")
        exp = self._experiment_id()
        if exp is not None:
            from npp.runtime.mlflow_utils import experiment_urls

            urls = experiment_urls("http://127.0.0.1:5000", exp)
            print(f"                then open {urls['runs']} (training runs) or {urls['charts']} (charts: pick "
                  "train_pflops as the x-axis)")
        if self.cfg.check_quality:
            ok = acc >= self.cfg.min_class_accuracy and fid < 0.5 * fid0
            verdict = "learned" if ok else "did NOT learn enough"
            print(
                f"\n  {verdict}: {acc:.0%} of samples classified as their class "
                f"(need {self.cfg.min_class_accuracy:.0%}), "
                f"fid_toynet {fid:.1f} vs {fid0:.1f} untrained (need < half)"
            )
            if not ok:
                raise SystemExit(1)

    def _experiment_id(self):
        import mlflow

        exp = mlflow.tracking.MlflowClient(self.mlflow_uri).get_experiment_by_name("npp-demo")
        return exp.experiment_id if exp else None

    def compare(self) -> dict:
        """`npp compare runs` on the toy set, one seed: NTP of the same epochs with a branch at NPP's training
        FLOPs, NPP (`make demo`'s run, reused), every end sampled and evaluated alike, compared."""
        from npp.app.experiment import CompareRunsConfig, Experiment, compute_matched_branches
        from npp.eval.compare import compare
        from npp.pipeline.shards import read_meta

        self.prepare()
        c = self.cfg
        schedules = c.schedules or c.schedule
        matched = c.branch_epochs
        if not matched:  # each schedule's compute-matched NTP epochs (the budget of NPP's FLOPs)
            grid = tuple(read_meta(self.shards)["grid"])
            matched = ",".join(map(str, compute_matched_branches(schedules.split(";"), c.epochs, c.model, grid)))
        cfg = CompareRunsConfig(
            shards=str(self.shards), vq=str(self.vq), ref=str(self.ref), classifier=str(self.classifier),
            out=str(self.out / "runs"), model=c.model, epochs=c.epochs, seeds=c.seeds or str(c.seed),
            schedules=schedules, branch_epochs=matched, per_class=c.samples_per_class, cfg_scale=c.cfg_scale,
            temperature=c.temperature, top_k=c.top_k, sample_flags=f"--batch 100 --seed {c.seed}",
            experiment="npp-demo", nproc=c.nproc, sample_nproc=1)  # a toy model samples in seconds: no torchrun
        exp = Experiment(cfg, self.recipe(), ["--ref", str(self.ref), "--classifier", str(self.classifier)])
        for job in exp.jobs():  # the demo's own check first: an old demo_out is refused with the fix
            if job.kind == "train":
                check_before_launch(job.run, _flags_of(job.args), c.nproc)
        t = _step(f"NTP ({c.epochs} epochs, branches at [{matched}] epochs) beside NPP ({schedules}), seeds "
                  f"{cfg.seed_list()}, every end evaluated on {c.samples_per_class} samples per class")
        def sample_and_eval(job) -> None:  # the same settings as the experiment's `npp sample` (one protocol)
            self.sample_and_eval(Path(job.args[job.args.index("--ckpt") + 1]), job.run, log=True)

        exp.run_here(self.env(), runners={"sample": sample_and_eval, "compare": lambda job: None})
        self.timings["compare runs"] = time.time() - t
        _step("NPP vs NTP")
        names = [j.name for j in exp.jobs() if j.kind in ("train", "branch")]
        return compare("npp-demo", str(self.out / "compare"), runs=names)


def _flags_of(args: list[str]) -> dict:
    """An `npp train` command line back into typed TrainConfig fields (npp.runtime.flags)."""
    from npp.runtime.flags import parse_flags
    from npp.train.config import TrainConfig

    return parse_flags([TrainConfig], args, "npp train")


def demo(cfg: DemoConfig) -> None:
    """Run the whole pipeline on the built-in toy dataset (CPU, 2 DeepSpeed processes)."""
    Demo(cfg).run()


def demo_compare(cfg: DemoConfig) -> None:
    """Train NTP (1:1) and NPP on the toy set with the same samples, evaluate both, compare."""
    Demo(cfg).compare()
