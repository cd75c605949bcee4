"""`--help` for every `npp` command, rendered from the declarations the command line is read against.

The flags a command takes, their types, defaults, choices and meanings are declared once (a config
dataclass's `flag(default, "meaning")` fields, and a method subcommand's parameters with its docstring's `Args:`),
and npp.runtime.flags reads the command line against them. Help is written from the same specs, so it
names every flag as users type it (`--per-class`, `--noema`), with what it accepts and its default, and
nothing else: fire's own help screen (kept out) invents one-letter flags npp refuses, lists internal
groups, and suggests `npp train -- --help`, which is answered here too.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

from npp.runtime.flags import FlagSpec, Numbers, accepts, flag_specs, is_bool, is_switch

WIDTH = 100


ABOUT = ("npp: class-conditional autoregressive image generators trained with Next Patch Prediction. "
         "The stages in order: tokenize (images -> VQ-code shards), train, sample, eval, compare; "
         "`npp demo` runs them all on a toy set.")


def first_paragraph(obj: Any) -> str:
    """What a command does: its docstring up to `Args:` (a class's: the config's own words); a group of
    commands (a dict) says which commands it holds."""
    if isinstance(obj, dict):
        return "Commands: " + ", ".join(obj) + "." if obj else ""
    doc = inspect.cleandoc(getattr(obj, "__doc__", "") or "")
    return doc.split("\nArgs:")[0].strip()


def summary(obj: Any) -> str:
    """A command's first sentence, for the list of commands."""
    text = " ".join(first_paragraph(obj).split("\n\n")[0].split())
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    return text if len(text) <= 90 else text[:87].rsplit(" ", 1)[0] + " ..."


def arg_meanings(obj: Any) -> dict[str, str]:
    """A function's `Args:` section as {parameter: meaning} (continuation lines joined)."""
    doc = inspect.cleandoc(getattr(obj, "__doc__", "") or "")
    if "\nArgs:" not in doc:
        return {}
    meanings: dict[str, str] = {}
    name = None
    for line in doc.split("\nArgs:", 1)[1].splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        head, colon, rest = stripped.partition(":")
        if colon and indent <= 2 and head.replace("_", "").isalnum():
            name = head
            meanings[name] = rest.strip()
        elif name is not None:
            meanings[name] += " " + stripped
    return meanings


def _default(spec: FlagSpec) -> str:
    if spec.required:
        return "required"
    value = spec.default
    if isinstance(value, bool):
        return f"default {'on' if value else 'off'}"
    if value is None:
        return "default none"
    if value == "":
        return "default empty"
    if isinstance(value, tuple):
        return "default " + ",".join(map(repr, value))
    return f"default {value}"


METAVARS = {"a whole number": "N", "a number": "X", "text": "TEXT"}


def metavar(spec: FlagSpec) -> str:
    """What a flag takes, short: N, X, TEXT, N|none, or its choices."""
    if spec.choices:
        return "|".join(map(str, spec.choices))
    if spec.kind == Numbers:
        return "X[,X...]"
    return "|".join(METAVARS.get(part, part) for part in accepts(spec.kind).split(" or "))


def _flag_line(spec: FlagSpec, meaning: str) -> list[str]:
    if is_bool(spec) and not is_switch(spec):
        name = f"{spec.dashed} / --no{spec.dashed[2:]}"
    else:
        name = f"{spec.dashed} {metavar(spec)}"
    text = meaning or ""
    if "default" not in text:
        text = f"{text} ({_default(spec)})" if text else f"({_default(spec)})"
    if spec.identity:
        text += "; defines the run: fixed at its first start (--allow-change)"
    out = [f"  {name}"]
    out += textwrap.wrap(text, WIDTH, initial_indent="      ", subsequent_indent="      ")
    return out


def flags_of(sources: list) -> list[tuple[FlagSpec, str]]:
    specs: dict[str, tuple[FlagSpec, str]] = {}
    for source in sources:
        meanings = arg_meanings(source)
        for name, spec in flag_specs(source).items():
            specs[name] = (spec, spec.help or meanings.get(name, ""))
    return list(specs.values())


def subcommand_names(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return list(obj)
    return [s.replace("_", "-") for s in getattr(obj, "subcommands", ())]


def render(words: list[str], obj: Any, sources: list, member) -> str:
    """The help of `npp <words>`: what it does, its usage, its subcommands, its flags."""
    command = " ".join(["npp", *words])
    described = sources[-1] if sources else obj
    lines = []
    about = ABOUT if not words else "" if isinstance(obj, dict) else first_paragraph(described if sources else obj)
    subs = subcommand_names(obj)
    usage = f"usage: {command}" + (" COMMAND" if isinstance(obj, dict) else "")
    flags = flags_of(sources)
    if flags:
        usage += " [flags]" if not any(s.required for s, _ in flags) else " " + " ".join(
            f"{s.dashed} {s.name.rstrip('_').upper()}" for s, _ in flags if s.required) + " [flags]"
    lines.append(usage)
    if about:
        lines += ["", "\n\n".join(textwrap.fill(p, WIDTH) for p in about.split("\n\n"))]
    if subs:
        lines += ["", "commands:"]
        for name in subs:
            target = member(obj, name)
            said = summary(target.__call__ if hasattr(target, "subcommands") and callable(target)
                           and not inspect.isclass(target) else target)
            lines.append(f"  {command} {name}" + (f": {said}" if said else ""))
    if flags:
        lines += ["", "flags:"]
        for spec, meaning in flags:
            lines += _flag_line(spec, meaning)
    if flags:
        lines += ["", textwrap.fill("A flag's value follows it (--epochs 300) or an = (--epochs=300); a switch also "
                                    "stands alone (--ema) or is turned off with --no (--noema).", WIDTH)]
    return "\n".join(lines) + "\n"
