"""The routing statistics of a model's MoE layers over one training step: the step's metrics
(moe_aux_loss, moe_max_load, moe_dropped) and the auxiliary-loss-free bias update.

`record(module)` runs after each training forward of a module holding MoE layers (a pipeline
stage; `watch` hooks it there): it adds what each of its layers left in `last_routing`. Recording after the stage rather
than after each layer counts every microbatch once, even where activation checkpointing runs a
block's forward again in backward. `finish_step` sums over the data ranks (each ran its own
microbatches) and over the pipeline stages (each holds its own layers).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn
from torch.distributed import ReduceOp

from angelptm.distributed.collectives import Group, all_reduce
from angelptm.models.moe import MoE


class MoEStepStats:
    """`layers`: this rank's MoE layers (of its pipeline stages), in model order. The sums stay on
    `device` (the one the collectives run on) until `finish_step`, so recording costs no host sync."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.device = device
        self._reset()

    def _reset(self) -> None:
        n_experts = self.layers[0].cfg.n_experts if self.layers else 0
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=self.device)  # float64: exact counts
        self.tokens_per_expert = zeros(len(self.layers), n_experts)
        self.dropped, self.aux_loss = zeros(()), zeros(())
        self.forwards = [0] * len(self.layers)

    def watch(self, stages: Sequence[nn.Module], aux_loss_scale: float) -> None:
        """Record each training forward of `stages` (this rank's pipeline stages, or the model), and
        give the layers' routing losses the gradient scale `aux_loss_scale`."""
        for layer in self.layers:
            layer.aux_loss_scale = aux_loss_scale
        for stage in stages if self.layers else []:
            stage.register_forward_hook(lambda module, args, out: self.record(module) if torch.is_grad_enabled() else None)

    def record(self, module: nn.Module) -> None:
        """Add the routing of the forward `module` (a stage, or the model) just ran."""
        for layer in module.modules():
            if isinstance(layer, MoE):
                i, stats = self._index[id(layer)], layer.last_routing
                self.tokens_per_expert[i] += stats.tokens_per_expert
                self.forwards[i] += 1
                self.dropped += stats.dropped
                self.aux_loss += stats.aux_loss

    def finish_step(self, data: Group, stages: Group, update_bias: bool) -> dict[str, float]:
        """moe_aux_loss (the mean over microbatches of their layers' summed auxiliary losses),
        moe_max_load (the busiest expert's token copies over the mean, in the most unbalanced layer,
        over the whole step) and moe_dropped (copies dropped over capacity in the step, all layers);
        then start a new step. Collective over `data` and `stages`: every rank calls it, a pipeline
        stage without MoE layers too. (cp ranks record the same routing for the tokens they share,
        which changes no ratio: the sums count each microbatch cp times, and so do the microbatches.)"""
        microbatches = torch.tensor(float(max(self.forwards, default=0)), dtype=torch.float64, device=self.device)
        totals = all_reduce(torch.cat([self.tokens_per_expert.flatten(),
                                       torch.stack([self.dropped, self.aux_loss, microbatches])]), data)
        tokens = totals[:self.tokens_per_expert.numel()].view_as(self.tokens_per_expert)
        dropped, aux_loss, microbatches = totals[tokens.numel():]
        if update_bias:
            for layer, load in zip(self.layers, tokens):
                if layer.router.expert_bias is not None:
                    layer.router.update_bias(load, layer.cfg.bias_update_rate)
        max_load = (tokens.max(dim=1).values / tokens.mean(dim=1).clamp(min=1e-12)).max() if self.layers \
            else torch.zeros((), dtype=torch.float64, device=self.device)
        dropped, aux_loss = all_reduce(torch.stack([dropped, aux_loss]), stages).tolist()
        max_load, microbatches = all_reduce(torch.stack([max_load, microbatches]), stages, ReduceOp.MAX).tolist()
        self._reset()
        return {"moe_aux_loss": aux_loss / max(microbatches, 1.0), "moe_max_load": max_load, "moe_dropped": int(dropped)}
