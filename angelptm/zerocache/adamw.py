"""The AdamW update on flat fp32 shards: torch's fused kernel, and on the host CPU a compiled
single-pass kernel for steps that divide the gradients.

The math is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments). `grad_scale`
divides the gradients inside the same pass, which is how ZeROCache averages over the dp group and
applies gradient clipping without an extra sweep over memory.

On a CPU the step is bound by memory traffic: at the least it reads param, grad, exp_avg and
exp_avg_sq and writes param, exp_avg and exp_avg_sq, 28 bytes per element. torch's fused kernel
moves exactly that without `grad_scale`, but with it also writes the divided gradients back (32
bytes). So large CPU tensors with a `grad_scale` take `_update` below instead, which inductor
compiles once per process into a vectorised loop threaded over the cores that moves the 28 bytes
only; without a scale torch's kernel stays, as it streams a few percent faster than inductor's
loop. Everything that changes from step to step (lr, bias corrections, the scale) reaches the
compiled kernel as tensor data, so a step never recompiles. Where compiling fails (no C++
compiler, say) the update logs one line and stays on torch's fused kernel.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

# Smaller tensors take torch's fused kernel: the compiled one saves a fraction of a millisecond
# on them per step and costs seconds of compiling per process.
COMPILED_MIN_NUMEL = 1 << 20


def _update(param, grad, exp_avg, exp_avg_sq, coef, grad_scale):
    """One pass of AdamW on grad / grad_scale, leaving grad as it is;
    coef = [1 - lr*wd, 1 - beta1, beta2, 1 - beta2, lr / bc1, sqrt(bc2), eps].

    Each line rounds as torch's CPU kernels do (lerp_ and addcmul_ are fused multiply-adds), so
    exp_avg and exp_avg_sq come out bitwise torch.optim.AdamW's and param within an ulp.
    """
    fma = torch.ops.prims.fma
    grad = grad / grad_scale
    avg = fma(coef[1], grad - exp_avg, exp_avg)  # exp_avg.lerp_(grad, 1 - beta1)
    avg_sq = fma(coef[3] * grad, grad, exp_avg_sq * coef[2])  # .mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    denom = avg_sq.sqrt() / coef[5] + coef[6]
    param.copy_(param * coef[0] - coef[4] * avg / denom)  # .mul_(1 - lr*wd).addcdiv_(avg, denom, -lr/bc1)
    exp_avg.copy_(avg)
    exp_avg_sq.copy_(avg_sq)


class _CompiledUpdate:
    """`_update`, compiled on first use; after a failure, off for the rest of the process."""

    def __init__(self) -> None:
        self.fn: Optional[Callable] = None
        self.failed = False

    def __call__(self, *args) -> bool:
        """Run the update; False (nothing written) when the kernel is unavailable."""
        if self.failed:
            return False
        try:
            if self.fn is None:
                import torch._inductor.inductor_prims  # registers torch.ops.prims.fma

                # dynamic: one kernel for every shard length; dynamic_threads: the kernel is
                # threaded whatever length it was first compiled for, with the thread count read
                # at run time.
                self.fn = torch.compile(_update, dynamic=True, fullgraph=True,
                                        options={"cpp.dynamic_threads": True})
            self.fn(*args)
        except Exception as error:  # any failure; compiling ends before the kernel writes anything
            self.failed = True
            reason = (str(error).strip().splitlines() or [""])[0]
            log.warning("CPU AdamW: the compiled single-pass kernel is unavailable (%s: %s); using "
                        "torch._fused_adamw_", type(error).__name__, reason)
            return False
        return True


_compiled = _CompiledUpdate()


def _takes_compiled(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                    grad_scale: Optional[torch.Tensor]) -> bool:
    return (grad_scale is not None and grad_scale.device.type == "cpu" and p.device.type == "cpu"
            and p.numel() >= COMPILED_MIN_NUMEL
            and all(t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.numel() == p.numel()
                    for t in (p, g, m, v)))


def _coefficients(step: torch.Tensor, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> torch.Tensor:
    """The step's scalars, computed in double as torch.optim.AdamW does, then rounded to fp32."""
    t = float(step)
    beta1, beta2 = betas
    return torch.tensor([1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** t),
                         (1 - beta2 ** t) ** 0.5, eps], dtype=torch.float32)


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

    All tensors sit on one device; `step` and `grad_scale` are float32 scalars there too. With
    `grad_scale`, `grads` may be left divided or not (torch's fused kernel divides them in place).
    """
    if not params:
        return
    fused = ([], [], [], [])  # the tensors left to torch's kernel
    coef = None
    for tensors in zip(params, grads, exp_avgs, exp_avg_sqs):
        if _takes_compiled(*tensors, grad_scale):
            if coef is None:
                coef = _coefficients(step, lr, betas, eps, weight_decay)
            with torch.no_grad():
                if _compiled(*tensors, coef, grad_scale):
                    continue
        for group, t in zip(fused, tensors):
            group.append(t)
    if fused[0]:
        torch._fused_adamw_(
            *fused, [], [step] * len(fused[0]),
            lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
            amsgrad=False, maximize=False, grad_scale=grad_scale, found_inf=None,
        )
