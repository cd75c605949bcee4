"""Exponential moving average of the weights, kept in fp32 beside the engine's model.

Starts as a copy (decay 0 at the first update, as DiT does) and is always in eval
mode: it is only ever used for sampling.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = 0.0 if self.updates == 0 else self.decay
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
