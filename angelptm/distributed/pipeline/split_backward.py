"""Split a backward pass in two for zero-bubble schedules: input gradients now, weight gradients later.

During an input-gradient pass (inside `postpone_weight_grads()`), layers compute only the
gradient they pass down and hand their weight-gradient work to the caller; the weight-gradient
pass (`run_weight_grads`) runs that work. Outside such a pass the work runs at once and its
gradient is returned through autograd as usual, so the same layers give an ordinary backward.
`split_linear_backward` gives a stage's `nn.Linear` layers this behaviour; other parameters
(norms, embeddings) get their gradients in the first pass, which costs little. A layer type of
one's own joins in by returning `weight_grad(weight, compute)` as its weight's gradient.

The weight pass is itself one autograd backward: each postponed gradient is computed by a graph
node of its own and accumulated into its weight by autograd, so it meets everything an ordinary
backward would (accumulation into `.grad`, post-accumulate-grad hooks such as ZeROCache's
gradient reduction), and autograd computes one postponed gradient at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

WeightWork = tuple[torch.Tensor, Callable[[], torch.Tensor]]  # (weight, computes its gradient)

# The work of the input-gradient pass in progress. A process-wide slot rather than a
# thread-local one: on CUDA, autograd runs backward functions on its own device threads.
_postponed: Optional[list[WeightWork]] = None


@contextmanager
def postpone_weight_grads() -> Iterator[list[WeightWork]]:
    """Collect, instead of running, the weight-gradient work of backward passes run inside."""
    global _postponed
    work: list[WeightWork] = []
    _postponed = work
    try:
        yield work
    finally:
        _postponed = None


def postponed_weight_work() -> Optional[list[WeightWork]]:
    """The work the input-gradient pass in progress has postponed so far; None outside such a pass."""
    return _postponed


def weight_grad(weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """`weight`'s gradient for a backward function to return: compute() now, or None when inside
    `postpone_weight_grads`, which keeps `compute` for the weight pass."""
    if _postponed is None:
        return compute()
    _postponed.append((weight, compute))
    return None


class _PostponedWeightGrad(torch.autograd.Function):
    """A graph node whose backward computes one postponed weight gradient."""

    @staticmethod
    def forward(ctx, weight, compute):
        ctx.compute = compute
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.compute(), None


def run_weight_grads(work: list[WeightWork]) -> None:
    """The weight-gradient pass: one backward through a node per piece of postponed work.

    The nodes are made in reverse so that autograd, which runs the newest ready node first, takes
    them in the order the input-gradient pass postponed them (the last layers first, as backward).
    """
    if not work:
        return
    with torch.enable_grad():
        roots = [_PostponedWeightGrad.apply(weight, compute) for weight, compute in reversed(work)]
    torch.autograd.backward(roots)


class _LinearSplitBackward(torch.autograd.Function):
    """y = x Wᵀ (+ b) whose backward returns dx (and db) and dW = dyᵀ x through `weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.weight = weight  # the parameter itself: ZeROCache stage 3 gathers it again for backward
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.has_bias else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(weight, lambda: grad_out.flatten(0, -2).t() @ x.flatten(0, -2))
        return grad_x, grad_weight, grad_bias


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
