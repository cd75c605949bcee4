"""Exponential moving average of the weights, fp32, on the training device.

Two keepers of the same average, with one interface (`make_ema` picks):
- `PartitionedEMA`, under DeepSpeed's ZeRO-1/2 optimizer (npp's default configs): each rank
  averages its own partition of the fp32 master weights, the flat tensor its optimizer
  steps (`single_partition_of_fp32_groups`), with one fused lerp per rank per step over
  1/world of the model; nothing is gathered or held in full until a checkpoint, an
  export or an eval point asks (`state_dict`, `full_model`: collectives every rank
  calls). The saved file is the same full state dict, and a resumed rank cuts its
  partition from it, so checkpoints and exports keep their format and a resumed run
  its exact average (DeepSpeed copies the fp32 partitions into the module after each
  step, so both keepers average the same numbers).
  DeepSpeed's BF16_Optimizer (ZeRO-1 with `--precision bf16`) is averaged the same way, over its
  `fp32_groups_flat_partition` (its parameters packed one after the other in each group's buffer).
- `EMA` everywhere else (a plain model, ZeRO-3 is refused): the whole model on rank 0, as follows.

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

    @property
    def loads(self) -> bool:
        return self.model is not None  # only the rank that keeps it

    def state_dict(self) -> dict | None:
        """The whole average on the rank that keeps it, None elsewhere (no collective)."""
        if self.model is None:
            return None
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if self.model is not None:
            self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def make_ema(engine, decay: float, keep: bool, master_weights: bool):
    """The EMA for this engine: partitioned under DeepSpeed's ZeRO-1/2 optimizer, else whole on rank 0 (`keep`)."""
    if PartitionedEMA.supports(engine.optimizer):
        return PartitionedEMA(engine, decay)
    return EMA(engine.module, decay, keep=keep, master_weights=master_weights)


class PartitionedEMA:
    """The average of this rank's partitions of the fp32 master weights (see the module docstring)."""

    loads = True  # every rank reads the saved average and keeps its own partition of it

    @staticmethod
    def flat_layout(optimizer):
        """(this rank's fp32 partitions, each group's parameters in their flat buffer's order, their offsets there,
        each group's partitions) of DeepSpeed's ZeRO-1/2 optimizer or of its BF16_Optimizer (ZeRO-1 with
        `--precision bf16`: parameters packed one after the other); None for any other."""
        if all(hasattr(optimizer, a) for a in ("single_partition_of_fp32_groups", "round_robin_bit16_groups",
                                               "round_robin_bit16_offsets", "parallel_partitioned_bit16_groups")):
            return (optimizer.single_partition_of_fp32_groups, optimizer.round_robin_bit16_groups,
                    optimizer.round_robin_bit16_offsets, optimizer.parallel_partitioned_bit16_groups)
        if all(hasattr(optimizer, a) for a in ("fp32_groups_flat_partition", "bf16_groups", "bf16_partitioned_groups")):
            offsets = [[sum(q.numel() for q in params[:i]) for i in range(len(params))]
                       for params in optimizer.bf16_groups]
            return (optimizer.fp32_groups_flat_partition, optimizer.bf16_groups, offsets,
                    optimizer.bf16_partitioned_groups)
        return None

    @staticmethod
    def supports(optimizer) -> bool:
        return PartitionedEMA.flat_layout(optimizer) is not None

    def __init__(self, engine, decay: float):
        self.engine, self.decay, self.updates = engine, decay, 0
        opt = engine.optimizer
        sources, groups, offsets, partitions = self.flat_layout(opt)
        self._sources = list(sources)
        self._parts = [t.detach().clone() for t in self._sources]
        names = {id(p): n for n, p in engine.module.named_parameters()}
        # per group: (name, offset in the group's flat buffer, shape, size) of each parameter, in the buffer's order
        self._layout = [[(names[id(p)], off, tuple(p.shape), p.numel()) for p, off in zip(ps, offs, strict=True)]
                        for ps, offs in zip(groups, offsets, strict=True)]
        self._groups = list(opt.real_dp_process_group)
        sizes = [[t.numel() for t in parts] for parts in partitions]
        if any(len(set(s)) != 1 for s in sizes):
            raise RuntimeError(f"unequal ZeRO partitions {sizes}: the partitioned EMA needs DeepSpeed's aligned "
                               "buffers")

    @torch.no_grad()
    def update(self, module: nn.Module | None = None) -> None:
        decay = 0.0 if self.updates == 0 else self.decay
        self.updates += 1
        torch._foreach_lerp_(self._parts, self._sources, 1.0 - decay)

    @torch.no_grad()
    def _full(self) -> dict[str, torch.Tensor]:
        """Every parameter's average, on every rank (an all-gather of each group's partitions): views of the
        gathered flat buffers, which the caller copies where it needs them."""
        import torch.distributed as dist

        state = {}
        for part, layout, group in zip(self._parts, self._layout, self._groups, strict=True):
            world = dist.get_world_size(group=group) if dist.is_initialized() else 1
            if world > 1:
                # on the engine's device: an offloaded optimizer keeps its partitions (and so these) on the CPU,
                # which NCCL cannot gather. Straight into one flat buffer: the gather holds the group once (a list
                # of pieces concatenated afterwards held it twice: GPT-XXL 11 GB for a moment on every rank)
                local = part.to(getattr(self.engine, "device", part.device))
                flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
                dist.all_gather_into_tensor(flat, local, group=group)
            else:
                flat = part
            for name, offset, shape, n in layout:
                state[name] = flat.narrow(0, offset, n).view(shape)
        return state

    def state_dict(self) -> dict | None:
        """The whole average in the saved format ({"model", "updates", "decay"}) on rank 0, None on the others
        (which take part in the gather: every rank calls it, as it calls `EMA.state_dict`)."""
        import torch.distributed as dist

        full = self._full()
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        order = [n for n, _ in self.engine.module.named_parameters()]
        return {"model": {n: full[n].cpu() for n in order}, "updates": self.updates, "decay": self.decay}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Cut this rank's partition out of a saved whole average."""
        import torch.distributed as dist

        model = state["model"]
        for part, layout, group in zip(self._parts, self._layout, self._groups, strict=True):
            rank = dist.get_rank(group=group) if dist.is_initialized() else 0
            start, size = rank * part.numel(), part.numel()
            for name, offset, _, n in layout:
                lo, hi = max(offset, start), min(offset + n, start + size)
                if lo < hi:  # this parameter has elements in this rank's partition
                    src = model[name].reshape(-1)[lo - offset : hi - offset]
                    part[lo - start : hi - start].copy_(src.to(part.device, part.dtype))
        self.updates = int(state["updates"])

    def full_model(self, model_cfg, device) -> nn.Module:
        """A whole fp32 model holding the average, on every rank (for an eval point; the caller drops it after)."""
        from npp.models.gpt import GPT

        model = GPT(model_cfg).to(device).eval()
        model.load_state_dict(self._full())
        for p in model.parameters():
            p.requires_grad_(False)
        return model
