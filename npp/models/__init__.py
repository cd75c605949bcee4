"""Models shared by every stage: the GPT, the VQ tokenizer, feature networks, size registry.

Nothing here imports a stage, DeepSpeed or MLflow.
"""

from .configs import GPT_SIZES, GPTConfig, count_parameters, gpt_config, train_flops_per_sample
from .generate import generate
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "GPT_SIZES", "gpt_config", "count_parameters", "train_flops_per_sample", "generate"]
