"""Models shared by every stage: the GPT, the VQ tokenizer, feature networks, size registry.

Nothing here imports a stage, DeepSpeed or MLflow. The size registry (`configs`) needs no
torch, and `npp.models.configs` stays importable without it (flag checks run before torch
is imported); `GPT` loads torch when first used.
"""

from .configs import GPT_SIZES, GPTConfig, count_parameters, gpt_config, train_flops_per_sample

__all__ = ["GPT", "GPTConfig", "GPT_SIZES", "gpt_config", "count_parameters", "train_flops_per_sample"]


def __getattr__(name: str):
    if name == "GPT":
        from .gpt import GPT

        return GPT
    raise AttributeError(f"module 'npp.models' has no attribute {name!r}")
