"""The command that starts `npp train` on N local processes with torchrun (the demo, the tests, the benches).

One place that knows torchrun's flags and turns a dict of TrainConfig fields into
`--flag value` pairs, exactly as a user types them (so fire parses them the same way).
"""

from __future__ import annotations

import sys

from npp.runtime.ranks import free_port


def train_flags(flags: dict) -> list[str]:
    out: list[str] = []
    for key, value in flags.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def torchrun_train_cmd(nproc: int, flags: dict, command: tuple[str, ...] = ("train",)) -> list[str]:
    """[python -m torch.distributed.run --nproc_per_node N --master_port P -m npp train --flag value ...];
    `command`: another npp command run the same way (`("train", "branch")`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "npp", *command, *train_flags(flags)]
