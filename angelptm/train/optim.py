"""The optimizers' common ground: AdamW's parameter groups, and `ReplicatedAdamW`, the plain
data-parallel engine for layouts ZeROCache does not shard yet.

Both engines (`ReplicatedAdamW` here, `angelptm.zerocache.ZeROCacheOptimizer`) answer the same
calls, so the trainer has one path: backward under `no_sync()`, `reduce_gradients()`,
`clip_grad_norm_()`, `step()`, `zero_grad()`, and `state_dict()` / `load_state_dict()` in a form
DCP saves and reshards.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from angelptm.config import OptimConfig
from angelptm.distributed.collectives import all_reduce_coalesced, group_of
from angelptm.distributed.mesh import DATA_DIMS
from angelptm.distributed.parallelize import clip_grad_norm_
from angelptm.distributed.tensor_parallel import from_checkpoint_state, reduce_partial_gradients, to_checkpoint_state


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms and biases do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """torch's fused AdamW kernel (CPU and GPU alike), foreach where fused is not available."""
    groups = parameter_groups(model, optim.weight_decay)
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:  # fused needs every parameter on a device type the kernel supports
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class ReplicatedAdamW:
    """torch AdamW on every rank, gradients all-reduced over dp × cp after the microbatches.

    The data-parallel engine for the layouts that need gradients in `.grad`, which ZeROCache does
    not compose with yet (tensor parallelism, the zero-bubble schedule): tp-partial gradients
    (sequence-parallel norms, shared kv heads) are summed over tp first. Its checkpoint state has
    ZeROCache's layout, {"model": {name}, "optim": {"exp_avg": {name}, "exp_avg_sq": {name},
    "step"}}, with tp shards as DTensors, so a checkpoint moves between the two engines and any
    layout.
    """

    def __init__(self, model: nn.Module, mesh: DeviceMesh, optim: OptimConfig):
        self.model, self.mesh = model, mesh
        self.tp, self.data = group_of(mesh, "tp"), group_of(mesh, DATA_DIMS)
        self.adamw = build_adamw(model, optim)
        self.param_groups = self.adamw.param_groups
        self.names = {p: name for name, p in model.named_parameters() if p.requires_grad}

    def no_sync(self) -> ContextManager:
        return nullcontext()  # gradients accumulate in .grad; reduce_gradients runs once per step

    def reduce_gradients(self) -> None:
        reduce_partial_gradients(self.model, self.tp)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        all_reduce_coalesced(grads, self.data)
        torch._foreach_div_(grads, self.data.size)

    def clip_grad_norm_(self, max_norm: float) -> float:
        return clip_grad_norm_(self.model, max_norm, self.mesh)

    def step(self) -> None:
        self.adamw.step()

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)

    def memory_metrics(self) -> dict:
        """Without a ledger of its own: the device allocator's peak, where there is one."""
        device = next(self.model.parameters()).device
        return {"mem_device_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}

    def _moments(self) -> dict:
        """Each parameter's AdamW state, created as a fresh optimizer would have it if absent."""
        fused = self.adamw.defaults.get("fused")
        for p in self.names:
            state = self.adamw.state[p]
            if not state:  # torch keeps a fused optimizer's step count on the parameter's device
                state["step"] = torch.zeros((), device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {p: self.adamw.state[p] for p in self.names}

    def state_dict(self) -> dict:
        moments = self._moments()
        step = next(iter(moments.values()))["step"] if moments else torch.zeros(())
        state = {
            "model": {name: p.detach() for p, name in self.names.items()},
            "optim": {
                "exp_avg": {name: moments[p]["exp_avg"] for p, name in self.names.items()},
                "exp_avg_sq": {name: moments[p]["exp_avg_sq"] for p, name in self.names.items()},
                "step": step.detach().to("cpu", copy=True),
            },
        }
        return to_checkpoint_state(state, self.model, self.mesh)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """`state` as filled from a checkpoint; without "optim" (weights only) the moments start at zero."""
        state = from_checkpoint_state(state, self.model)
        optim = state.get("optim")
        moments = self._moments()
        for p, name in self.names.items():
            p.copy_(state["model"][name])
            for key in ("exp_avg", "exp_avg_sq"):
                if optim:
                    moments[p][key].copy_(optim[key][name])
                else:
                    moments[p][key].zero_()
            moments[p]["step"].fill_(float(optim["step"]) if optim else 0.0)
