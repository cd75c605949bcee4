"""Flags that mean what they say: declared once with their meaning, converted by their type before any work.

fire hands a command the Python literal it guesses from each word: `--ema=false` arrives as the
string 'false' (truthy), `--epochs=abc` as a string that fails deep inside training, and a typo
(`--epoch 3`) prints fire's usage screen. So the `npp` command line is read here first, against
the command's declared flags (a config dataclass's fields, and a method subcommand's own parameters):

- booleans: `--ema`, `--noema`, `--ema=VALUE` / `--ema VALUE` with true/false/yes/no/on/off/1/0 in any case;
- integers and floats by their type; `Optional[...]` also takes `none`; choices by their list;
- an unknown flag is refused with the closest known one (`did you mean --epochs?`);
- a missing required flag is refused with its meaning.

Anything refused is one `UsageError` line (exit 2). What passes is handed on to fire as exact
Python literals (`--name=<repr>`), so fire builds the command with the typed values and the
user's strings as typed.

Meanings live in one place, the field's `flag(default, "meaning")` (a method subcommand's own parameters: its
docstring's `Args:`); `--help` is rendered from these specs (npp.app.help), and `documented` also writes them into
the class docstring's `Args:` section, for readers of the code and `help()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import keyword
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Union

from npp.errors import UsageError
from npp.runtime.settings import FALSE_WORDS, TRUE_WORDS, switch

Numbers = tuple[float, ...]  # a flag of one number or several, comma-separated: `--cfg-scale 1.5,2.0` (a sweep)


def numbers(value: Any) -> tuple[float, ...]:
    """A `Numbers` flag's value, from the command line's text (`2`, `1.5,2.0`) or an in-process number or sequence;
    ValueError for anything else (a word that is not a finite number, or nothing)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        words = [value]
    elif isinstance(value, (list, tuple)):
        words = list(value)
    else:
        words = [w for w in str(value).strip("[]() ").split(",") if w.strip()]
    out = tuple(float(w) for w in words)
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{value!r} is not a number or a comma list of numbers")
    return out


class Checked:
    """A command's config whose values need no resolving: once `validate()` (every check, before torch) has passed,
    the frozen config is its own plan. A config that resolves something returns a plan of its own instead
    (TrainConfig.plan: a TrainPlan)."""

    def validate(self) -> None:
        """Refuse values and inputs that cannot work, naming the flag and the fix (nothing to check: nothing)."""

    def plan(self):
        self.validate()
        return self


def need(ok: bool, message: str) -> None:
    """A config's check of a value: refused in one line (exit 2) when not `ok`."""
    if not ok:
        raise UsageError(message)


def flag(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None,
         identity: bool = False) -> Any:
    """A config field with its meaning (shown by `--help`) and, optionally, the values it accepts; `identity`:
    the flag defines a run, fixed at its first start (npp.train.identity)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "identity": identity}
    return dataclasses.field(default=default, metadata=meta)


def flag_of(config: type, name: str, help: str = "") -> Any:
    """Another config's flag `name`, declared there once (its default and choices; its meaning, unless this
    command says it in its own words), as a field of this one under a name of its own: TrainConfig's
    `eval_per_class` is EvalSpec's `per_class`."""
    source = {f.name: f for f in dataclasses.fields(config)}[name]
    return flag(source.default, help or source.metadata.get("help", ""), source.metadata.get("choices"))


def documented(cls: type) -> type:
    """Append an `Args:` section, built from the fields' meanings, to a dataclass's docstring (for `help()` and
    readers of the code; `npp ... --help` reads the fields themselves, npp.app.help)."""
    lines = []
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            text += ("; one of " if text else "One of ") + ", ".join(str(c) for c in choices)
        lines.append(f"  {f.name}: {text}" if text else f"  {f.name}:")
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "\nArgs:" in doc:
        doc = doc[: doc.index("\nArgs:")]
    cls.__doc__ = doc.rstrip() + "\n\nArgs:\n" + "\n".join(lines) + "\n"
    return cls


@dataclasses.dataclass
class FlagSpec:
    name: str
    kind: Any  # the resolved annotation
    default: Any  # inspect.Parameter.empty when required
    choices: tuple | None = None
    help: str = ""
    identity: bool = False

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def dashed(self) -> str:
        return "--" + self.name.rstrip("_").replace("_", "-")


def _hints(obj: Any) -> dict:
    try:
        return typing.get_type_hints(obj)  # a class: its fields' annotations, resolved in their own modules
    except Exception:  # an annotation that cannot be resolved: treat it as untyped
        return {}


def flag_specs(target: Callable) -> dict[str, FlagSpec]:
    """The flags a command takes: a dataclass's fields (with their meanings) or a function's parameters."""
    specs: dict[str, FlagSpec] = {}
    hints = _hints(target)
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    for name, p in inspect.signature(target).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        f = fields.get(name)
        specs[name] = FlagSpec(name, hints.get(name, str if p.annotation is p.empty else p.annotation), p.default,
                               f.metadata.get("choices") if f else None, f.metadata.get("help", "") if f else "",
                               bool(f.metadata.get("identity")) if f else False)
    return specs


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (Union, types.UnionType)  # Optional[T] / Union[...], or T | None


def _optional_inner(kind: Any) -> tuple[Any, bool]:
    """(T, True) for Optional[T] (T | None); (kind, False) otherwise."""
    if _is_union(kind):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) < len(typing.get_args(kind)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007 (built at run time)
    return kind, False


def accepts(kind: Any) -> str:
    inner, optional = _optional_inner(kind)
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
             Numbers: "a number or a comma list of numbers"}
    if _is_union(inner):
        text = " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in typing.get_args(inner))
    else:
        text = names.get(inner, getattr(inner, "__name__", str(inner)))
    return text + (" or none" if optional else "")


def convert(spec: FlagSpec, value: Any, command: str) -> Any:
    """The flag's value as its declared type, or a UsageError naming the flag, the value and what it accepts."""
    inner, optional = _optional_inner(spec.kind)
    text = value if isinstance(value, str) else None

    def refuse(what: str | None = None) -> UsageError:
        return UsageError(f"{command} {spec.dashed}: {value!r} is not {what or accepts(spec.kind)}"
                          + (f" ({spec.help})" if spec.help else ""))

    if optional and text is not None and text.strip().lower() in ("none", "null"):
        return None
    if is_switch(spec):  # auto | on | off, also spelled --name / --noname / true / false (npp.runtime.settings)
        try:
            word = switch(value, spec.dashed)
        except UsageError:
            word = None
        if word not in spec.choices:
            raise refuse("one of " + ", ".join(map(str, spec.choices)))
        return word
    if inner == Numbers:
        try:
            return numbers(value)
        except ValueError:
            raise refuse() from None
    kinds = typing.get_args(inner) if _is_union(inner) else (inner,)
    out: Any = dataclasses.MISSING
    for kind in kinds:
        try:
            if kind is bool:
                if isinstance(value, bool):
                    out = value
                elif text is not None and text.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                    out = text.strip().lower() in TRUE_WORDS
                else:
                    continue
            elif kind is int:
                number = int(text.strip().replace("_", "")) if text is not None else int(value)
                if isinstance(value, float) and value != number:
                    raise ValueError
                out = number
            elif kind is float:
                number = float(text) if text is not None else float(value)
                if not math.isfinite(number):  # nan/inf: no flag means them, and fire reads `nan` back as text
                    raise ValueError
                out = number
            elif kind is str:
                out = str(value)
            else:
                out = value
            break
        except (TypeError, ValueError):
            continue
    if out is dataclasses.MISSING:
        raise refuse()
    if spec.choices and out not in spec.choices:
        raise refuse("one of " + ", ".join(map(str, spec.choices)))
    return out


def is_bool(spec: FlagSpec) -> bool:
    """A flag that may stand alone (`--ema`, `--noema`): a boolean, or a switch with on/off among its choices."""
    return _optional_inner(spec.kind)[0] is bool or is_switch(spec)


def is_switch(spec: FlagSpec) -> bool:
    return bool(spec.choices) and {"on", "off"} <= set(spec.choices)


def _closest(word: str, known: list[str]) -> str:
    match = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean --{match[0].replace('_', '-')}?" if match else ""


HELP_WORDS = ("--help", "-h")


class HelpRequested(Exception):
    """`--help` anywhere among a command's words, or `-h` where a flag stands (as a flag's value, `-h` is a value:
    `--run-name -h`): the caller shows the command's help instead of running it."""


def parse_flags(sources: list[Callable], args: list[str], command: str) -> dict[str, Any]:
    """The typed values of the flags in `args` for the command whose flags `sources` declare (a config
    class or function, plus a method's own parameters); only those given; refuses unknown or bad ones.

    `args` are the words after the command's name (up to a lone `--`, fire's own flags). Positional
    words fill the required flags in order, as fire does. Raises HelpRequested for a help word.
    """
    if "--help" in args:
        raise HelpRequested
    specs: dict[str, FlagSpec] = {}
    for source in sources:
        specs.update(flag_specs(source))
    known = list(specs)
    values: dict[str, Any] = {}
    positional = [s for s in specs.values() if s.required]
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "-h":
            raise HelpRequested
        if tok.startswith("-") and not _is_number(tok):
            name, eq, raw = tok.lstrip("-").partition("=")
            key = name.replace("-", "_")
            if key not in specs and keyword.iskeyword(key) and key + "_" in specs:  # --from: a parameter `from_`
                key += "_"
            spec = specs.get(key)
            if spec is None and key.startswith("no") and key[2:] in specs and is_bool(specs[key[2:]]) and not eq:
                values[key[2:]] = convert(specs[key[2:]], False, command)
                i += 1
                continue
            if spec is None:
                raise UsageError(f"unknown flag --{name} for {command}{_closest(key, known)} "
                                 f"(`{command} --help` lists the flags)")
            if eq:
                value: Any = raw
                i += 1
            elif is_bool(spec):
                nxt = args[i + 1] if i + 1 < len(args) else None
                takes = nxt is not None and (nxt.strip().lower() in TRUE_WORDS + FALSE_WORDS
                                             or (is_switch(spec) and not nxt.startswith("-")))
                if takes:
                    value, i = nxt, i + 2
                else:
                    value, i = True, i + 1
            else:
                if i + 1 >= len(args):
                    raise UsageError(f"{command} {spec.dashed} needs a value ({accepts(spec.kind)})")
                value, i = args[i + 1], i + 2
            values[key] = convert(spec, value, command)
        else:
            free = [s for s in positional if s.name not in values]
            if not free:
                raise UsageError(f"{command}: unexpected argument {tok!r} (flags are written --name VALUE)")
            values[free[0].name] = convert(free[0], tok, command)
            i += 1
    missing = [s for s in specs.values() if s.required and s.name not in values]
    if missing:
        raise UsageError(f"{command} needs " + ", ".join(
            f"{s.dashed}" + (f" ({s.help})" if s.help else "") for s in missing))
    return values


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def as_fire_args(values: dict[str, Any]) -> list[str]:
    """Typed values as words fire reads back exactly (Python literals)."""
    return [f"--{name}={value!r}" for name, value in values.items()]
