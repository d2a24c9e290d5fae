"""The plain optimizer: AdamW over two parameter groups (matrices decay; norms and biases do not).

torch's fused AdamW kernel runs on CPU and GPU alike; foreach is the fallback where fused is not
available. ZeROCache (angelptm.zerocache) replaces this when the optimizer state is sharded or
paged.
"""

from __future__ import annotations

import torch
from torch import nn

from angelptm.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, optim.weight_decay)
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:  # fused needs every parameter on a device type the kernel supports
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
