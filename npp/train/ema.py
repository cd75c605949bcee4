"""Exponential moving average of the weights, fp32, on the training device, held once (rank 0).

Built after `deepspeed.initialize`, from the engine's module on its device, so the
update is a device-local `mul_/add_` (an EMA built from the CPU model before
initialize crashed at the first GPU step adding CUDA to CPU tensors). It tracks the
fp32 weights: under bf16-mixed the module's weights are fp32 already; under
DeepSpeed's pure bf16 the module holds bf16 copies, so every rank takes part in
gathering the fp32 master weights (`safe_get_full_fp32_param`, a collective) and
rank 0 accumulates them. Only rank 0 keeps the copy (GPT-XXL: 5.6 GB, not 5.6 GB
per rank). ZeRO-3 partitions the module itself and is refused with --ema before any
work (see ds_config). Starts as a copy (decay 0 at the first update, as DiT does)
and is always in eval mode: it is only ever used for sampling.

The update is one fused multi-tensor lerp over all parameters (`torch._foreach_lerp_`),
not a mul_/add_ pair per tensor: GPT-XXL has 340 parameter tensors, and per-tensor
kernels cost more launch time on the host than the arithmetic takes on the GPU.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, module: nn.Module, decay: float, keep: bool = True, master_weights: bool = True):
        """`module`: the engine's module, on its device. `keep`: this rank holds the EMA (rank 0).
        `master_weights`: the module's parameters are the fp32 master weights (else gather them)."""
        self.decay = decay
        self.master_weights = master_weights
        self.model: nn.Module | None = None
        self._params: list[torch.Tensor] = []
        if keep:
            self.model = copy.deepcopy(module).float().eval()
            for m in self.model.modules():  # a compiled module's copy would still call the original's graph
                if getattr(m, "_compiled_call_impl", None) is not None:
                    m._compiled_call_impl = None
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._params = list(self.model.parameters())
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = 0.0 if self.updates == 0 else self.decay
        self.updates += 1
        if self.master_weights:
            if self.model is None:
                return  # nothing to gather, nothing kept here
            sources = list(module.parameters())  # read under no_grad: no detach (a view op per tensor) needed
        else:
            from deepspeed.utils import safe_get_full_fp32_param

            sources = [safe_get_full_fp32_param(p) for p in module.parameters()]  # collective: every rank calls it
            if self.model is None:
                return
        if sources[0].dtype != self._params[0].dtype:
            sources = [s.to(self._params[0].dtype) for s in sources]
        # ema + (1 - decay)·(source − ema) = decay·ema + (1 − decay)·source, every tensor in one fused op
        torch._foreach_lerp_(self._params, sources, 1.0 - decay)

    def state_dict(self) -> dict:
        assert self.model is not None, "only the rank that keeps the EMA saves it"
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if self.model is not None:
            self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
