"""Split a backward pass in two for zero-bubble schedules: input gradients now, weight gradients later.

During an input-gradient pass (inside `postpone_weight_grads()`), layers compute only the
gradient they pass down and hand their weight-gradient work to the caller as closures; the
weight-gradient pass runs those closures. Outside such a pass the work runs at once, so the same
layers give an ordinary backward. `split_linear_backward` gives a stage's `nn.Linear` layers
this behaviour; other parameters (norms, embeddings) get their gradients in the first pass, which
costs little. A layer type of one's own joins in by calling `weight_grad` from its backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

# The closures of the input-gradient pass in progress. A process-wide slot rather than a
# thread-local one: on CUDA, autograd runs backward functions on its own device threads.
_postponed: Optional[list[Callable[[], None]]] = None


@contextmanager
def postpone_weight_grads() -> Iterator[list[Callable[[], None]]]:
    """Collect, instead of running, the weight-gradient work of backward passes run inside."""
    global _postponed
    work: list[Callable[[], None]] = []
    _postponed = work
    try:
        yield work
    finally:
        _postponed = None


def weight_grad(work: Callable[[], None]) -> None:
    """Run `work` now, or keep it for the weight-gradient pass when inside `postpone_weight_grads`."""
    if _postponed is None:
        work()
    else:
        _postponed.append(work)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _LinearSplitBackward(torch.autograd.Function):
    """y = x Wᵀ (+ b) whose backward returns dx (and db) and hands dW = dyᵀ x to `weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.weight = weight  # the parameter itself, so its .grad is the one that accumulates
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.has_bias else None
        if ctx.needs_input_grad[1]:
            def weight_work() -> None:
                _accumulate(weight, grad_out.flatten(0, -2).t() @ x.flatten(0, -2))
            weight_grad(weight_work)
        return grad_x, None, grad_bias


def split_linear_backward(module: nn.Module) -> None:
    """Make every plain `nn.Linear` in `module` postpone its weight gradient when asked.

    Only exact `nn.Linear` instances change (subclasses with forwards of their own keep them);
    replacing the instance's forward keeps parameter names and hooks as they were.
    """
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.forward = _split_forward(layer)


def _split_forward(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _LinearSplitBackward.apply(x, layer.weight, layer.bias)
    return forward
