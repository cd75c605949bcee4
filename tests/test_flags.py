"""Flags mean what the user typed: typed, documented, checked before torch, defaults in Python only.

Each case is a command line users type (`--ema=false`, `--epochs=abc`, a typo, the wrong file in
the right place); on 7b3cb8a every one of them was accepted as something else, or died with a
traceback or fire's usage screen.
"""

import dataclasses
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from npp.app.cli import COMMANDS, SampleCommand, TokenizeCommand, TrainCommand, main, normalize_argv
from npp.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def npp(*args, cwd=REPO, env=None):
    """`npp ARGS` in a fresh interpreter that fails if torch was imported before the refusal."""
    code = ("import sys\nfrom npp.app.cli import main\ncode = 0\n"
            f"try:\n    main({list(args)!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stdout)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", **(env or {})})


def typed(*argv):
    """The values fire receives for a command line, as Python objects."""
    out = {}
    for word in normalize_argv(list(argv)):
        if word.startswith("--"):
            name, _, literal = word[2:].partition("=")
            out[name] = eval(literal)  # noqa: S307 - our own repr()s
    return out


@pytest.mark.parametrize("words,value", [
    (["--ema=false"], False), (["--ema=FALSE"], False), (["--ema=no"], False), (["--ema", "No"], False),
    (["--ema=0"], False), (["--noema"], False), (["--ema"], True), (["--ema=true"], True), (["--ema", "yes"], True),
    (["--ema=1"], True),
])
def test_booleans_read_as_typed(words, value):
    assert typed("train", "--shards", "s", "--out", "o", *words)["ema"] is value


def test_a_value_that_fails_its_check_is_refused_not_kept_half_converted():
    """`convert` once kept float('inf') (and int(2.5) == 2) after the check that refused it had raised."""
    from npp.runtime.flags import convert, flag_specs
    from npp.train.config import TrainConfig

    specs = flag_specs(TrainConfig)
    for spec, value in ((specs["lr"], "inf"), (specs["lr"], float("nan")), (specs["epochs"], 2.5)):
        with pytest.raises(UsageError, match="is not a"):
            convert(spec, value, "npp train")
    assert convert(specs["epochs"], 3.0, "npp train") == 3 and convert(specs["lr"], "1e-3", "npp train") == 1e-3


def test_every_boolean_and_switch_of_every_command():
    assert typed("tokenize", "run", "--data", "d", "--vq", "v", "--out", "o", "--ten-crop=false")["ten_crop"] is False
    assert typed("train", "--shards", "s", "--out", "o", "--tracking=no")["tracking"] is False
    assert typed("eval", "--samples", "s", "--ref", "r", "--log=false")["log"] is False
    assert typed("eval", "watch", "--run", "r", "--once=off")["once"] is False
    assert typed("demo", "--check-quality=False")["check_quality"] is False
    assert typed("ui", "--serve=false")["serve"] is False
    assert typed("train", "--shards", "s", "--out", "o", "--nocompile")["compile"] == "off"
    assert typed("train", "--shards", "s", "--out", "o", "--compile")["compile"] == "on"
    assert typed("train", "--shards", "s", "--out", "o", "--compile=false")["compile"] == "off"
    # strings stay as typed: a run called 1e3, a path that looks like a number
    assert typed("train", "--shards", "2024", "--out", "1e3")["out"] == "1e3"
    assert typed("train", "--shards", "s", "--out", "o", "--total-steps", "none")["total_steps"] is None
    sample = ("sample", "--ckpt", "c", "--vq", "v", "--out", "o", "--cfg-scale")
    assert typed(*sample, "1.5,2.0")["cfg_scale"] == (1.5, 2.0) and typed(*sample, "2")["cfg_scale"] == (2.0,)
    with pytest.raises(UsageError, match=r"--cfg-scale: '1.5,x' is not a number or a comma list of numbers"):
        typed(*sample, "1.5,x")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--shards", "s", "--out", "o", "--epochs=abc"], "npp train --epochs: 'abc' is not a whole number"),
        (["train", "--shards", "s", "--out", "o", "--lr=1e-4x"], "npp train --lr: '1e-4x' is not a number"),
        (
            ["tokenize", "run", "--data", "d", "--vq", "v", "--out", "o", "--workers", "two"],
            "--workers: 'two' is not a whole number",
        ),
        (["train", "--shards", "s", "--out", "o", "--ema=maybe"], "--ema: 'maybe' is not true or false"),
        (
            ["train", "--shards", "s", "--out", "o", "--precision", "fp16"],
            "--precision: 'fp16' is not one of auto, bf16-mixed, bf16, fp32",
        ),
        (
            ["train", "--shards", "s", "--out", "o", "--epoch", "3"],
            "unknown flag --epoch for npp train; did you mean --epochs?",
        ),
        (["train", "--out", "o"], "npp train needs --shards (shard-set directory"),
        (["trian", "--out", "o"], "unknown command npp trian; did you mean npp train?"),
        (["train", "chek", "--shards", "s"], "unknown command npp train chek; did you mean npp train check?"),
        (["eval", "wach", "--run", "r"], "unknown command npp eval wach; did you mean npp eval watch?"),
        (["train", "execute"], "npp train has no command 'execute' (commands: export, convert, check, branch)"),
        (["train", "to_dict"], "npp train has no command 'to_dict'"),
        (["demo", "--per-clas", "3"], "did you mean --per-class?"),
        (["demo", "--warmup-epochs", "-1"], "--warmup-epochs must be at least 0, got -1"),
        (["demo", "--warmup-epochs=nan"], "npp demo --warmup-epochs: 'nan' is not a number"),
        (["train", "--shards", "s", "--out", "o", "--lr", "inf"], "npp train --lr: 'inf' is not a number"),
    ],
)
def test_bad_values_are_one_line_naming_flag_value_and_what_it_accepts(argv, message):
    proc = npp(*argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("npp: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "NO-TORCH" in proc.stdout


def test_user_paths_are_echoed_as_typed(tmp_path):
    proc = npp("train", "--shards", "work/shards", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "work/shards is not a shard set" in proc.stderr, proc.stderr
    assert "'\"'" not in proc.stderr


def _documented_params(fn) -> dict:
    import fire.docstrings

    info = fire.docstrings.parse(inspect.getdoc(fn) or "")
    return {a.name: (a.description or "") for a in (info.args or [])}


def _every_command(table=None, words=()):
    """Every command's words and what they reach, as `npp` resolves them (groups, classes, their subcommands)."""
    from npp.app.cli import _member
    from npp.app.help import subcommand_names

    table = COMMANDS if table is None else table
    for name in subcommand_names(table):
        target = _member(table, name)
        yield [*words, name], target
        yield from _every_command(target, [*words, name])


def _command_classes() -> list:
    return [(" ".join(words), target) for words, target in _every_command() if inspect.isclass(target)]


@pytest.mark.parametrize("name,command", _command_classes(), ids=[n for n, _ in _command_classes()])
def test_every_command_is_a_frozen_config_declared_beside_its_stage_whose_flags_have_meanings(name, command):
    """One declaration per command (item 1 of the architecture issue): its flags are a frozen dataclass's fields,
    declared in the stage's (torch-free) module, not in the CLI; each has a meaning, which `--help` and the class
    docstring show; its `plan()` is what runs."""
    config = command.__mro__[1]
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen, name
    assert config.__module__ != "npp.app.cli" and not config.__module__.startswith("tests"), name
    documented = _documented_params(command)
    for f in dataclasses.fields(command):
        assert f.metadata.get("help", "").strip() and documented.get(f.name, "").strip(), f"npp {name} --{f.name}"
    assert callable(getattr(config, "plan", None)), name


def test_a_method_subcommand_documents_the_flags_it_adds():
    methods = [(" ".join(words), target) for words, target in _every_command() if inspect.isfunction(target)]
    assert {n for n, _ in methods} == {"tokenize run check", "train check", "sample check", "demo compare"}
    for name, fn in methods:
        documented = _documented_params(fn)
        for p in inspect.signature(fn).parameters:
            assert p == "self" or documented.get(p, "").strip(), f"npp {name} --{p} has no meaning in its docstring"


# Words users may type as values: numbers of every shape, text that reads as another type, quotes, commas, `=`.
_VALUE_WORDS = ("true", "false", "on", "off", "auto", "none", "-3", "0", "1_000", "1000000000000", "0.1", "-2.5e-7",
                "1e300", "1e3", "2024", "a,b", "1.5,2.0", " x y ", "'q\"", "--x", "-h", "[1]", "{}", "True", "", "ü",
                "=", "a=b", "runs/gpt b")


def test_fire_reads_back_exactly_the_values_npp_typed():
    """fire dispatches (docs/architecture.md): it is handed the typed values as Python literals and reads them
    again. That second read must give back each value and its type, for every flag of every command and every
    kind of word a user may type as its value."""
    import fire

    from npp.app.cli import _command
    from npp.runtime.flags import convert, flag_specs, parse_flags

    def fire_reads(**values):
        return values

    checked = 0
    for words, _ in _every_command():
        _, _, sources, _ = _command(words)
        specs = {name: spec for source in sources for name, spec in flag_specs(source).items()}
        if not specs:
            continue
        accepted = {}
        for name, spec in specs.items():
            pool = [*_VALUE_WORDS, *(str(c) for c in spec.choices or ())]
            accepted[name] = [w for w in pool if _converts(convert, spec, w)]
            assert accepted[name], (words, name)
        for i in range(max(len(a) for a in accepted.values())):
            argv = [f"{specs[n].dashed}={a[i % len(a)]}" for n, a in accepted.items()]
            typed_values = parse_flags(sources, argv, "npp " + " ".join(words))
            handed = normalize_argv([*words, *argv])[len(words):]
            got = fire.Fire(fire_reads, command=handed, name="npp", serialize=lambda _: None)
            assert got == typed_values, (words, argv)
            assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in typed_values.items()}, words
            checked += len(argv)
    assert checked > 1000


def _converts(convert, spec, word) -> bool:
    try:
        convert(spec, word, "npp")
        return True
    except UsageError:
        return False


def test_help_shows_each_flag_with_its_meaning_and_default(capsys):
    proc = subprocess.run([sys.executable, "-m", "npp", "train", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PAGER": "cat"}, timeout=60)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    flat = " ".join(text.split())
    for f in dataclasses.fields(TrainCommand):
        dashed = "--" + f.name.replace("_", "-")
        assert re.search(rf"^  {dashed}[ \n]", text, re.M), f.name
        assert " ".join(f.metadata["help"].split()[:4]) in flat, f.name
    assert "--model GPT-B|GPT-L" in text and "(default GPT-B)" in flat and "(default 300)" in flat
    assert "--ema / --noema" in text and "--compile auto|on|off" in text
    for internal in ("to_dict", "validate", "execute", "eval_spec", "check_values", "subcommands", "INFO:",
                     "--per_class", "-e,"):
        assert internal not in text
    # fire's hint `npp train -- --help` and `-h` give the same page; every command has a page, each flag in it
    # spelled as users type it, with a meaning
    main(["train", "--", "--help"])
    assert capsys.readouterr().out == proc.stdout
    assert typed("train", "--shards", "s", "--out", "o", "--run-name", "-h")["run_name"] == "-h"  # a value
    from npp.app.cli import _command
    from npp.app.help import flags_of

    for words, _ in _every_command():
        main([*words, "-h"])
        page = capsys.readouterr().out
        assert page.startswith(f"usage: npp {' '.join(words)}"), words
        for spec, meaning in flags_of(_command(words)[2]):
            assert f"  {spec.dashed}" in page and meaning, (words, spec.name)
            assert "_" not in spec.dashed, (words, spec.dashed)
    main(["tokenize"])  # a group without one of its commands: what it holds, not fire's screen
    assert capsys.readouterr().out.startswith("usage: npp tokenize COMMAND")
    main(["eval", "--samples", "--help"])  # --help anywhere asks for help
    assert capsys.readouterr().out.startswith("usage: npp eval")
    main([])
    top = capsys.readouterr().out
    assert all(f"  npp {name}" in top for name in ("tokenize", "train", "sample", "eval", "compare", "demo")), top


def test_version_names_the_commit(capsys):
    main(["--version"])
    out = capsys.readouterr().out
    assert re.fullmatch(r"npp \d+\.\d+\.\d+ \(git ([0-9a-f]{40}|unknown)\)\n", out), out


@pytest.mark.parametrize("target,variables,said", [
    ("train", ["SHARDS={tmp}/none", "RUN={tmp}/run"], "is not a shard set (no meta.json)"),
    ("sample", ["CKPT={tmp}/none.pt", "VQ={tmp}/vq.pt", "SAMPLES={tmp}/s"], "--ckpt {tmp}/none.pt does not exist"),
])
def test_make_train_and_sample_check_before_torchrun(tmp_path, target, variables, said):
    """A bad input under `make train`/`make sample` is npp's one line, not that line and then torchrun's
    ChildFailedError traceback (the -slurm targets check on the login node the same way)."""
    proc = subprocess.run(["make", "-s", "-C", str(REPO), target, "NGPU=2",
                           *[v.format(tmp=tmp_path) for v in variables]], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and said.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert "torchrun" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_make_help_lists_the_variables_of_each_target_with_defaults():
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^  train-slurm .*\[NODES GPUS_PER_NODE SBATCH_FLAGS", out, re.M)
    assert re.search(r"^  MODEL +\(empty\) +model size \(npp: GPT-B", out, re.M)
    assert re.search(r"^  NODES +1 +", out, re.M)
    for target in re.findall(r"^([a-z-]+):.*## ", (REPO / "Makefile").read_text(), re.M):
        assert f"  {target} " in out


def _python_defaults(config) -> set:
    return {str(f.default) for f in dataclasses.fields(config)
            if f.default is not dataclasses.MISSING and f.default not in (None, "", True, False)}


@pytest.mark.parametrize("target,config", [("train", TrainCommand), ("train-slurm", TrainCommand),
                                           ("sample", SampleCommand), ("tokenize", TokenizeCommand),
                                           ("tokenize-slurm", TokenizeCommand)])
def test_make_passes_no_python_default(target, config):
    """With no variable set, the command make runs names only the required flags (paths): every other value is
    npp's own default, so a default changed in Python reaches make and sbatch runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "WORKERS", "EPOCHS", "SCHEDULE", "GPUS_PER_NODE")}
    proc = subprocess.run(["make", "-n", "-C", str(REPO), "-o", ".venv/.npp-setup-stamp", target], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if " -m npp " in ln or "/npp " in ln or "npp train" in ln
                or "npp tokenize" in ln)
    words = shlex.split(line.replace("$((", "").replace("))", ""))
    flags = [
        w
        for w in words
        if w.startswith("--") and w[2:].replace("-", "_") in {f.name for f in dataclasses.fields(config)}
    ]
    required = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(config) if f.default is dataclasses.MISSING}
    assert set(flags) <= required, line
    values = {w for i, w in enumerate(words) if i and words[i - 1] in flags}
    assert not values & _python_defaults(config), line


def test_shipped_deepspeed_configs_hold_no_key_npp_overrides():
    from npp.train.ds_config import replaced_keys

    for path in sorted((REPO / "ds_configs").glob("*.json")):
        assert replaced_keys(json.loads(path.read_text())) == [], path.name


def test_a_key_npp_replaces_is_said(tmp_path, shard_set):
    from npp.train.config import TrainConfig
    from npp.train.plan import make_plan

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 5.0, "train_batch_size": 3}))
    plan = make_plan(TrainConfig(shards=str(shard_set), out=str(tmp_path / "r"), model="GPT-Nano", global_batch=16,
                                 ds_config=str(ds)), world_size=1)
    assert any("train_batch_size, gradient_clipping replaced by npp's flags" in n for n in plan.notes), plan.notes


def test_train_check_from_another_directory_finds_the_default_deepspeed_config(tmp_path, shard_set):
    proc = npp("train", "check", "--shards", str(shard_set), "--out", str(tmp_path / "r"), "--model", "GPT-Nano",
               "--global-batch", "16", "--world-size", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "npp train: ok: GPT-Nano on 80 samples (8 shards)" in proc.stdout and "ZeRO-2" in proc.stdout
    assert str(REPO / "ds_configs" / "zero2.json") in proc.stdout and "NO-TORCH" in proc.stdout
    assert not (tmp_path / "r").exists()  # a check writes nothing
    proc = npp("train", "check", "--shards", str(shard_set), "--out", str(tmp_path / "r"), "--model", "GPT-Nano",
               "--global-batch", "16", "--world-size", "3", cwd=tmp_path)
    assert proc.returncode == 2 and "does not divide by world size 3" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run folder, an exported GPT, a VQ tokenizer, a shard set without its manifest."""
    import torch

    from tests.helpers import make_gpt, save_small_vq

    root = tmp_path_factory.mktemp("files")
    save_small_vq(root / "vq.pt")
    model = make_gpt()
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "steps": 1}, root / "model.pt")
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run" / "config.json").write_text("{}")
    (root / "noman").mkdir()
    (root / "noman" / "meta.json").write_text(json.dumps({"complete": True}))
    (root / "images" / "empty").mkdir(parents=True)
    (root / "flat").mkdir()
    (root / "flat" / "a.jpg").write_bytes(b"x")
    return root


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["sample", "--ckpt", "{r}/run", "--vq", "{r}/vq.pt", "--out", "{r}/s"],
            "--ckpt {r}/run is a training run folder, not a model file: export it first with "
            "`npp train export --run {r}/run`",
        ),
        (
            ["sample", "--ckpt", "{r}/vq.pt", "--vq", "{r}/vq.pt", "--out", "{r}/s"],
            "--ckpt {r}/vq.pt is a VQ tokenizer, not a GPT",
        ),
        (
            ["sample", "--ckpt", "{r}/model.pt", "--vq", "{r}/model.pt", "--out", "{r}/s"],
            "--vq {r}/model.pt is a GPT checkpoint, not a VQ tokenizer",
        ),
        (["sample", "--ckpt", "{r}/images", "--vq", "{r}/vq.pt", "--out", "{r}/s"], "--ckpt {r}/images is a directory"),
        (
            ["sample", "--ckpt", "{r}/nope.pt", "--vq", "{r}/vq.pt", "--out", "{r}/s"],
            "--ckpt {r}/nope.pt does not exist",
        ),
        (
            ["tokenize", "run", "--data", "{r}/images", "--vq", "{r}/model.pt", "--out", "{r}/sh"],
            "--vq {r}/model.pt is a GPT checkpoint",
        ),
        (
            ["tokenize", "run", "--data", "{r}/flat", "--vq", "{r}/vq.pt", "--out", "{r}/sh"],
            "--data {r}/flat has no class folders and no .parquet files",
        ),
        (
            ["tokenize", "run", "--data", "{r}/images/empty", "--vq", "{r}/vq.pt", "--out", "{r}/sh"],
            "--data {r}/images/empty is an empty directory",
        ),
        (["train", "--shards", "{r}/noman", "--out", "{r}/r2"], "{r}/noman has no manifest.parquet"),
        (["train", "--shards", "{r}/noman", "--out", "{r}/noman"], "--out {r}/noman is a shard set"),
        (
            ["train", "--shards", "{r}/noman", "--out", "{r}/r2", "--ds-config", str(REPO / "ds_configs")],
            f"--ds-config {REPO / 'ds_configs'} is a directory, not a DeepSpeed JSON file",
        ),
    ],
)
def test_the_wrong_file_in_the_right_place_is_named_before_torch(files, argv, message):
    proc = npp(*[a.format(r=files) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert message.format(r=files) in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "NO-TORCH" in proc.stdout


def test_sample_refuses_a_precision_it_does_not_have(files):
    with pytest.raises(UsageError, match="--precision: 'bf16-mixed' is not one of auto, fp32, bf16"):
        normalize_argv(["sample", "--ckpt", "c", "--vq", "v", "--out", "o", "--precision", "bf16-mixed"])
