"""DeepSpeed's checkpoint layout, the one module that knows its file names (they are DeepSpeed's, not npp's).

A checkpoint tag folder under RUN/checkpoints (npp.pipeline.runs) holds DeepSpeed's files beside npp's own
(the RNG, EMA and client-state files RunFolder names): `mp_rank_00_model_states.pt` (the module's weights
unless ZeRO partitions them), one `*zero_pp_rank_*optim_states.pt` per rank under ZeRO, and, once converted by
`ds_to_universal` (`npp train convert`), a `zero/` folder of per-parameter states and no optimizer partition.
Torch and DeepSpeed are imported only to gather weights.
"""

from __future__ import annotations

from pathlib import Path

MODULE_STATES = "mp_rank_00_model_states.pt"
ZERO_PARTITIONS = "*zero_pp_rank_*optim_states.pt"
OPTIMIZER_STATES = "*optim_states.pt"
UNIVERSAL_FOLDER = "zero"


def is_universal(tag_dir: Path) -> bool:
    """A checkpoint in DeepSpeed's universal format (loads on any world size)."""
    return (tag_dir / UNIVERSAL_FOLDER).is_dir() and not list(tag_dir.glob(OPTIMIZER_STATES))


def consolidated_state(checkpoints: Path, tag: str) -> dict:
    """A checkpoint's full fp32 weights with LlamaGen's names: ZeRO partitions gathered by DeepSpeed's
    zero_to_fp32; without ZeRO the module states file holds them."""
    import torch

    from npp.models.checkpoint import strip_prefixes

    tag_dir = checkpoints / tag
    if list(tag_dir.glob(ZERO_PARTITIONS)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    else:  # a file our own trainer wrote: DeepSpeed's module states pickle
        state = torch.load(tag_dir / MODULE_STATES, map_location="cpu", weights_only=False)["module"]
    return {k: v.float().clone() for k, v in strip_prefixes(state).items()}
