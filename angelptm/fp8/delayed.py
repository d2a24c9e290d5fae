"""Delayed scaling state: each FP8 operand's amax history, the scale derived from it, and the per-step update.

Delayed scaling (Transformer Engine's default) casts with a scale computed *before* the tensor
is seen, from the largest amax of the last `amax_history_len` steps, so a cast reads its input
once and records the new amax on the way. Slot 0 of the history collects the running amax of
the current step (the max over all microbatches); `update_delayed_scales`, called once after
each optimizer step, all-reduces slot 0 over the ranks that share the tensor, derives the next
scale from the whole history, and rotates the history so the oldest step falls out.

Until the first update a state has no history, so its operand is cast with current scaling
(and its amax still recorded): the first step behaves like the tensorwise recipe. A non-finite
recorded amax (an overflowing step) enters the history as zero.
The histories, scales and that flag are buffers, so checkpoints carry them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from angelptm.fp8.formats import Fp8Format
from angelptm.fp8.scaling import all_reduce_max, scale_from_amax


class DelayedScale(nn.Module):
    """Amax history and scale of one operand (input, weight or output gradient) of one layer."""

    def __init__(self, fmt: Fp8Format, history_len: int, margin: int = 0, power_of_two: bool = False,
                 amax_floor: float = 1e-12, groups: Sequence = (), device=None):
        super().__init__()
        self.fmt, self.margin, self.power_of_two, self.amax_floor = fmt, margin, power_of_two, amax_floor
        self.groups = tuple(groups)
        self.register_buffer("amax_history", torch.zeros(history_len, device=device))
        self.register_buffer("scale", torch.ones((), device=device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        # Mirror of `initialized` in Python, so the forward pass branches without a device sync.
        self.ready = False
        self.register_load_state_dict_post_hook(_mirror_initialized)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the state of a new layer: empty history, unit scale (e.g. after `to_empty`)."""
        self.amax_history.zero_()
        self.scale.fill_(1.0)
        self.initialized.fill_(False)
        self.ready = False

    @property
    def current_amax(self) -> torch.Tensor:
        """1-element view of this step's running amax; casts raise it in place."""
        return self.amax_history[:1]

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, history={self.amax_history.numel()}, margin={self.margin}"


def _mirror_initialized(module: DelayedScale, incompatible_keys) -> None:
    module.ready = bool(module.initialized)


@torch.no_grad()
def update_delayed_scales(states: Iterable[DelayedScale]) -> None:
    """All-reduce this step's amaxes, set each next scale from its history, rotate the histories.

    Batched: one all-reduce per distinct set of groups and a handful of kernels per
    (format, options) class, however many layers there are.
    """
    states = list(states)
    by_groups: dict[tuple, list[DelayedScale]] = {}
    for state in states:
        by_groups.setdefault(tuple(id(g) for g in state.groups), []).append(state)
    for members in by_groups.values():
        if not members[0].groups:
            continue
        current = torch.cat([m.current_amax for m in members])
        all_reduce_max(current, members[0].groups)
        torch._foreach_copy_([m.current_amax for m in members], list(current.split(1)))

    by_kind: dict[tuple, list[DelayedScale]] = {}
    for state in states:
        key = (state.fmt, state.margin, state.power_of_two, state.amax_floor, state.amax_history.numel())
        by_kind.setdefault(key, []).append(state)
    for members in by_kind.values():
        first = members[0]
        # A step whose tensors overflowed (the trainer skips its update) records inf or nan; it
        # must not set the scale to zero for the length of the history, so it counts as no amax.
        history = torch.stack([m.amax_history for m in members]).nan_to_num_(nan=0.0, posinf=0.0)
        scales = scale_from_amax(history.amax(dim=1), first.fmt, first.power_of_two, first.amax_floor,
                                 first.margin)
        rotated = history.roll(1, dims=1)
        rotated[:, 0] = 0
        torch._foreach_copy_([m.scale for m in members], list(scales.unbind()))
        torch._foreach_copy_([m.amax_history for m in members], list(rotated.unbind()))
        for m in members:
            if not m.ready:
                m.initialized.fill_(True)
                m.ready = True
