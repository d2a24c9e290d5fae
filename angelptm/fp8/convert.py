"""Swap a model's eligible `nn.Linear` layers for `Float8Linear` and give its MoE experts FP8 GEMMs,
and advance delayed scaling once per step.

Eligible: a plain `nn.Linear` whose two dimensions are multiples of 16 (what FP8 GEMMs need)
and whose name no `skip` entry matches. The output head is skipped by default: the logits feed
a softmax over the whole vocabulary and are where FP8 costs the most accuracy for the least
speed. Embeddings are lookups, never converted. MoE experts (`GroupedExperts`, the expert-parallel
ones included) under the same rules get a `Float8Experts` (see `grouped.py`; delayed scaling runs
them with current scaling); the router is not an `nn.Linear` and stays in float32.
"""

from __future__ import annotations

from typing import Callable, Iterable, Union

from torch import nn

from angelptm.fp8.delayed import DelayedScale, update_delayed_scales
from angelptm.fp8.grouped import Float8Experts
from angelptm.fp8.linear import _ALIGN, Float8Linear
from angelptm.fp8.scaling import AmaxGroups, Float8Recipe, recipe_from_name
from angelptm.models.moe import GroupedExperts

DEFAULT_SKIP = ("output", "embedding")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A skip entry matches the module's full name, its last component, or a parent's name."""
    parts = name.split(".")
    for entry in skip:
        if name == entry or parts[-1] == entry or name.startswith(entry + "."):
            return True
    return False


def convert_to_float8(model: nn.Module, recipe: str | Float8Recipe = "tensorwise", *,
                      skip: Iterable[str] = DEFAULT_SKIP,
                      amax_groups: Union[AmaxGroups, Callable[[str], AmaxGroups], None] = None,
                      **recipe_options) -> nn.Module:
    """Replace eligible linear layers in place (parameters are shared, not copied); returns `model`.

    `recipe` is a recipe object or a name ("tensorwise", "delayed", "rowwise", "blockwise") with
    its options as keywords (e.g. `amax_history_len=16`, `power_of_two_scales=True`).
    `amax_groups` is one `AmaxGroups` for every layer, or a function of a layer's full name giving
    its own: under tensor parallelism a column-parallel layer's output gradient is sharded and a
    row-parallel layer's input is, so the two kinds all-reduce different operands.
    Convert materialised models: delayed-scaling state is created on the weights' device.
    """
    recipe = recipe_from_name(recipe, **recipe_options)
    skip = tuple(skip)
    groups_of = amax_groups if callable(amax_groups) else (lambda name: amax_groups)
    for name, module in model.named_modules():
        if (isinstance(module, GroupedExperts) and module.float8 is None and not _skipped(name, skip)
                and all(d % _ALIGN == 0 for d in module.w1.shape[1:])):
            module.float8 = Float8Experts(recipe)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (type(child) is nn.Linear and child.in_features % _ALIGN == 0 and child.out_features % _ALIGN == 0
                    and not _skipped(name, skip)):
                setattr(parent, child_name, Float8Linear.from_linear(child, recipe, groups_of(name)))
    return model


def update_float8_scales(model: nn.Module) -> None:
    """Call once after each optimizer step: drops every cached FP8 weight (the next forward casts
    the updated weight) and, for delayed scaling, all-reduces and rotates the amax histories.

    `torch.optim` optimizers drop the weight caches themselves (see `linear.py`); for any other
    optimizer this call is what keeps the FP8 weights current. Cheap for every recipe, so a
    training loop can call it unconditionally.
    """
    states = []
    for module in model.modules():
        if isinstance(module, (Float8Linear, Float8Experts)):
            module.refresh_weight()
        elif isinstance(module, DelayedScale):
            states.append(module)
    update_delayed_scales(states)
