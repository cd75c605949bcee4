"""The two settings training and sampling share, each read and resolved in one place: the auto | on | off
switch (`--compile`, `--eval-compile`) and the numeric precision (`--precision`, `--eval-precision`).

The command line reaches them typed (npp.runtime.flags turns `--compile`, `--nocompile`, `--compile=false` into
"on" / "off"); in-process callers (the demo, benches, tests) may pass True/False, read here the same way.
"""

from __future__ import annotations

from npp.errors import UsageError

SWITCH = ("auto", "on", "off")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")

# bf16-mixed: fp32 weights and optimizer, the forward under bf16 autocast (training only: LlamaGen's recipe);
# bf16: the weights in bf16 (training: DeepSpeed's bf16 mode with fp32 master weights; sampling: the weights and
# the KV cache, half the cache's bytes); fp32: everything in fp32
TRAINING_PRECISIONS = ("bf16-mixed", "bf16", "fp32")
SAMPLING_PRECISIONS = ("bf16", "fp32")


def switch(value, name: str = "--compile") -> str:
    """auto | on | off, from the flag's words or a bool."""
    word = "on" if value is True else "off" if value is False else str(value).strip().lower()
    word = "on" if word in TRUE_WORDS else "off" if word in FALSE_WORDS else word
    if word not in SWITCH:
        raise UsageError(f"{name} must be auto, on or off (or --no{name.removeprefix('--')}), got {value!r}")
    return word


def switched_on(value, auto: bool, name: str = "--compile") -> bool:
    """The switch resolved: `auto` is what "auto" means here (for --compile: on CUDA)."""
    word = switch(value, name)
    return auto if word == "auto" else word == "on"


def precision(value: str, cuda: bool, training: bool, name: str = "--precision") -> str:
    """The precision a run or a sampler uses. auto: on CUDA bf16-mixed for training (LlamaGen's recipe) and bf16
    for sampling (decoding is bound by reading the KV cache), fp32 on the CPU (where bf16 matmuls are slow and
    the tests compare exact values). Resolved once per command; what ran is recorded as resolved."""
    allowed = TRAINING_PRECISIONS if training else SAMPLING_PRECISIONS
    if value == "auto":
        return ("bf16-mixed" if training else "bf16") if cuda else "fp32"
    if value not in allowed:
        raise UsageError(f"{name} must be one of auto, {', '.join(allowed)}; got {value!r}")
    return value
