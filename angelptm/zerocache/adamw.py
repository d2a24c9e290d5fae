"""The AdamW update on flat fp32 shards: torch's fused kernel, on the device or on the host CPU.

One call updates many shards at once (a multi-tensor launch on a GPU, a vectorised, threaded
loop on a CPU). The math is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments);
`grad_scale` divides the gradients inside the same pass, which is how ZeROCache averages over the
dp group and applies gradient clipping without an extra sweep over memory.
"""

from __future__ import annotations

from typing import Optional

import torch


def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """Update `params`, `exp_avgs` and `exp_avg_sqs` in place; `step` is already incremented.

    All tensors sit on one device; `step` and `grad_scale` are float32 scalars there too. The
    kernel writes the divided gradients back into `grads` when `grad_scale` is given.
    """
    if not params:
        return
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(params),
        lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
        amsgrad=False, maximize=False, grad_scale=grad_scale, found_inf=None,
    )
