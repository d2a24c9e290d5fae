"""The cached FP8 weight follows every optimizer step, whatever the optimizer's update path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from angelptm.fp8 import Float8Linear, convert_to_float8, update_float8_scales


def make_pair(recipe: str):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    fp8 = convert_to_float8(copy.deepcopy(reference), recipe, skip=())
    assert sum(isinstance(m, Float8Linear) for m in fp8) == 2
    return reference, fp8


def assert_fp8_weights_are_current(model: nn.Module, x: torch.Tensor) -> None:
    """Each layer's output equals that of a fresh layer sharing its (current) weight, which has no cache."""
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, Float8Linear):
                fresh = Float8Linear.from_linear(layer, layer.recipe)
                assert torch.equal(layer(x), fresh(x)), "the layer used a stale FP8 weight"
            x = layer(x)


@pytest.mark.parametrize("flavour", [{"fused": True}, {"foreach": True}, {"foreach": False}])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_tracks_full_precision_under_every_adamw_path(flavour, recipe):
    reference, fp8 = make_pair(recipe)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, **flavour) for m in (reference, fp8)]
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 64, generator=gen), torch.randn(64, 32, generator=gen)
    versions = [p._version for p in fp8.parameters()]
    curves = {"reference": [], "fp8": []}
    for _ in range(15):
        for name, model, opt in zip(curves, (reference, fp8), optimizers):
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[name].append(loss.item())
        assert_fp8_weights_are_current(fp8, x)
    if flavour.get("fused"):
        # The premise: a fused step leaves version counters alone, so only the step hook can tell.
        assert [p._version for p in fp8.parameters()] == versions
    ref, got = curves["reference"], curves["fp8"]
    assert ref[-1] < 0.7 * ref[0], "the reference must learn for the comparison to mean anything"
    for step, (r, g) in enumerate(zip(ref, got)):
        assert abs(g - r) <= 0.05 * r, f"step {step}: fp8 loss {g:.4f} vs reference {r:.4f}"


def test_update_float8_scales_refreshes_weights_changed_behind_the_version_counter():
    """Optimizers outside torch.optim may write through `.data`, which bumps no version: the
    per-step `update_float8_scales` call is what keeps those FP8 weights current."""
    _, fp8 = make_pair("tensorwise")
    x = torch.randn(16, 64)
    fp8(x)
    with torch.no_grad():
        for p in fp8.parameters():
            p.data.mul_(-2.0)
    update_float8_scales(fp8)
    assert_fp8_weights_are_current(fp8, x)


def test_copies_of_a_layer_drop_their_cache_on_optimizer_steps_too():
    _, fp8 = make_pair("tensorwise")
    clone = copy.deepcopy(fp8)
    opt = torch.optim.AdamW(clone.parameters(), lr=1e-1, fused=True)
    x = torch.randn(16, 64)
    clone(x).square().sum().backward()
    opt.step()
    assert_fp8_weights_are_current(clone, x)
