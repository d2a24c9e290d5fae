"""Turn a plain model into the one this rank runs: activation checkpointing, then materialisation.

The model file knows nothing of parallelism; everything layout-specific is applied here from the
outside, as torchtitan does. `parallelize` works on a meta-device model, so no rank ever holds
more than its share; `materialize` then allocates the real storage and fills it with the same
initial values a single process would have.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from angelptm.config import Config


def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module` in backward instead of saving its activations.

    Replacing the instance's forward (rather than wrapping the module) keeps parameter names, and
    so checkpoints and initial values, unchanged.
    """
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """full: recompute whole transformer blocks; selective: recompute only the attention core."""
    if mode == "none":
        return
    for block in model.layers.values():
        _checkpoint_forward(block if mode == "full" else block.attention.core)


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: Config) -> nn.Module:
    """Apply the layout `cfg` asks for to `model` (on any device, meta included) and return it."""
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return model


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate the parameters on `device` and give them the layout-independent initial values."""
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model
