"""The `npp` command: one fire CLI whose subcommands are the pipeline's stages.

Stages register here as they land; each entry returns None so fire prints nothing
but what the stage itself prints.
"""

from __future__ import annotations

import os
import sys

import fire

from npp.models.configs import GPT_SIZES, count_parameters, gpt_config
from npp.train.schedule import PatchSchedule, paper_schedule, parse_schedule


def models(vocab_size: int = 16384, num_classes: int = 1000, block_size: int = 256) -> None:
    """List the model sizes with their parameter counts."""
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
    """
    cfg = gpt_config(model, block_size=block_size)
    stages = (
        paper_schedule(patch_levels, epoch_rate, epochs) if patch_levels else parse_schedule(str(schedule or "1:1"), cfg.grid)
    )
    sched = PatchSchedule(stages, epochs * steps_per_epoch)
    for span, flops in zip(sched.spans, sched.flops_per_sample(cfg)):
        print(
            f"stage {span.index}: k={span.patch_side} steps [{span.start}, {span.end}) "
            f"epochs [{span.start / steps_per_epoch:g}, {span.end / steps_per_epoch:g}) "
            f"{flops / 1e9:.1f} GFLOP/sample"
        )
    print(f"training cost vs next-token prediction ({model}): {sched.cost_ratio(cfg):.4f}")


COMMANDS = {"models": models, "schedule": schedule}


def main() -> None:
    """Run a subcommand; user errors print one clear line (NPP_DEBUG=1 shows the traceback)."""
    try:
        fire.Fire(COMMANDS, name="npp")
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("NPP_DEBUG"):
            raise
        print(f"npp: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
