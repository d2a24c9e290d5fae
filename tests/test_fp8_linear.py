"""Float8Linear: forward, input gradient and weight gradient against float64, per recipe, and against torchao."""

import copy
import warnings

import pytest
import torch
from torch import nn

from angelptm.errors import UserError
from angelptm.fp8 import (E4M3, AmaxGroups, DelayedRecipe, Float8Linear, RowwiseRecipe, TensorwiseRecipe,
                          convert_to_float8, recipe_from_name, update_float8_scales)

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")
M_SHAPE, K, N = (3, 37), 256, 160  # 111 tokens: not a multiple of 16, so the padding path runs


def log_uniform(shape, seed):
    """Random signs, magnitudes spread log-uniformly over 8 binades below 1: every scaled value
    stays a normal FP8 number, so the format's relative rounding bound holds element by element."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return sign * torch.exp2(-8 * torch.rand(shape, generator=gen))


@pytest.fixture(scope="module")
def data():
    x = log_uniform((*M_SHAPE, K), 1)
    w = log_uniform((N, K), 2) / K**0.5
    dy = log_uniform((*M_SHAPE, N), 3)
    return x, w, dy


def reference(x, w, dy):
    """Exact products in float64: y, dx, dw, and the |A||B| magnitudes each GEMM's error scales with."""
    x64, w64, dy64 = x.double().flatten(0, 1), w.double(), dy.double().flatten(0, 1)
    exact = (x64 @ w64.t(), dy64 @ w64, dy64.t() @ x64)
    magnitude = (x64.abs() @ w64.abs().t(), dy64.abs() @ w64.abs(), dy64.abs().t() @ x64.abs())
    return exact, magnitude


def run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    dx, dw = torch.autograd.grad(y, (x, layer.weight), dy)
    return y.flatten(0, 1), dx.flatten(0, 1), dw


def float8_layer(recipe, w):
    base = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    return Float8Linear.from_linear(base, recipe)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name", RECIPES)
def test_errors_stay_under_the_format_bound(name, data):
    """|got - exact| <= (u_a + u_b + u_a u_b + K 2^-23) |A||B| element by element, for each GEMM,
    with u the unit roundoff of each operand's format (E5M2 gradients: twice E4M3's)."""
    x, w, dy = data
    recipe = recipe_from_name(name)
    layer = float8_layer(recipe, w)
    got = run(layer, x, dy)
    exact, magnitude = reference(x, w, dy)
    u_in, u_w, u_g = (f.unit_roundoff for f in (recipe.input_format, recipe.weight_format, recipe.grad_format))
    contracted = (K, N, x.numel() // K)
    for label, g, e, mag, (ua, ub), k in zip(("y", "dx", "dw"), got, exact, magnitude,
                                             ((u_in, u_w), (u_g, u_w), (u_g, u_in)), contracted):
        bound = (ua + ub + ua * ub + k * 2.0**-23) * mag
        worst = ((g.double() - e).abs() / bound).max().item()
        assert worst <= 1.0, f"{name} {label}: error reaches {worst:.2f}x the format bound"


@pytest.mark.parametrize("ours,theirs", [(TensorwiseRecipe(), "tensorwise"),
                                         (RowwiseRecipe(power_of_two_scales=True), "rowwise")])
def test_no_worse_than_torchao(ours, theirs, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    x, w, dy = data
    exact, _ = reference(x, w, dy)
    base = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    torchao_model = convert_to_float8_training(nn.Sequential(copy.deepcopy(base)),
                                               config=Float8LinearConfig.from_recipe_name(theirs))
    assert type(torchao_model[0]).__name__ == "Float8Linear"
    baseline = run(torchao_model[0], x, dy)
    got = run(Float8Linear.from_linear(base, ours), x, dy)
    for label, g, b, e in zip(("y", "dx", "dw"), got, baseline, exact):
        ours_err, theirs_err = rel_err(g, e), rel_err(b, e)
        assert ours_err <= theirs_err * 1.02 + 1e-7, f"{label}: ours {ours_err:.4e} vs torchao {theirs_err:.4e}"


def test_delayed_scaling_matches_tensorwise_once_its_history_holds_the_same_amax(data):
    x, w, dy = data
    delayed, current = float8_layer("delayed", w), float8_layer("tensorwise", w)
    first = run(delayed, x, dy)  # no history yet: current scaling, amaxes recorded
    update_float8_scales(delayed)
    second = run(delayed, x, dy)  # scales from the history, which holds exactly these amaxes
    want = run(current, x, dy)
    for a, b, c in zip(first, second, want):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_blockwise_beats_rowwise_when_magnitudes_vary_along_k(data):
    """Loud activations meet quiet weights in the first 128 input channels, so both halves of K
    matter to y. One scale per row must cover both halves and flushes the quiet one towards
    zero; per-tile and per-block scales keep both. The gradients contract over other dimensions
    and come out alike."""
    x, w, dy = data
    x, w = x.clone(), w.clone()
    x[..., :128] *= 2.0**16
    w[:, :128] /= 2.0**16
    exact, _ = reference(x, w, dy)
    rowwise, blockwise = run(float8_layer("rowwise", w), x, dy), run(float8_layer("blockwise", w), x, dy)
    assert rel_err(blockwise[0], exact[0]) < 0.5 * rel_err(rowwise[0], exact[0])
    for label, r, b, e in zip(("dx", "dw"), rowwise[1:], blockwise[1:], exact[1:]):
        assert rel_err(b, e) <= 1.1 * rel_err(r, e), label


@pytest.mark.parametrize("name", RECIPES)
def test_bias_autocast_and_shapes(name):
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True)
    layer = Float8Linear.from_linear(copy.deepcopy(base), name)
    x = torch.randn(2, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 48)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.bias.grad, torch.full((48,), 10.0))
    want = base(x.detach())
    assert rel_err(layer(x.detach()), want.double()) < 0.1


def test_weight_is_cast_once_per_optimizer_step():
    torch.manual_seed(0)
    layer = Float8Linear(64, 32, bias=False, recipe="tensorwise")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16, 64, requires_grad=True)
    layer(x).sum().backward()
    first = layer._weight_cache
    layer(x).sum().backward()  # a second microbatch: same FP8 weight, no recast
    assert layer._weight_cache is first
    assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) and t.numel() in (1, 64 * 32)
               for q in first[1:] for t in (q.data, q.scale_inv)), "cache must hold FP8 copies only"
    assert first[1].data.dtype == torch.float8_e4m3fn
    opt.step()
    layer(x).sum().backward()
    assert layer._weight_cache is not first
    recast = layer._weight_cache
    layer.refresh_weight()
    layer(x)
    assert layer._weight_cache is not recast


def test_inference_skips_the_transposed_copies():
    layer = Float8Linear(64, 32, recipe="tensorwise")
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert layer._weight_cache[2] is None


def test_bad_dimensions_and_recipes_are_user_errors():
    with pytest.raises(UserError, match="divisible by 16"):
        Float8Linear(60, 32)
    with pytest.raises(UserError, match="precision.fp8.recipe"):
        Float8Linear(64, 32, recipe="mxfp8")
    with pytest.raises(UserError, match="amax_history_len"):
        recipe_from_name("tensorwise", amax_history_len=4)


def test_convert_skips_the_head_and_ineligible_layers_and_shares_parameters():
    model = nn.ModuleDict({"proj": nn.Linear(64, 128), "odd": nn.Linear(64, 100), "output": nn.Linear(128, 256)})
    params = {id(p) for p in model.parameters()}
    convert_to_float8(model, "rowwise")
    assert isinstance(model["proj"], Float8Linear) and model["proj"].recipe == RowwiseRecipe()
    assert type(model["odd"]) is nn.Linear and type(model["output"]) is nn.Linear
    assert {id(p) for p in model.parameters()} == params
    model2 = nn.ModuleDict({"output": nn.Linear(128, 256)})
    convert_to_float8(model2, "tensorwise", skip=())
    assert isinstance(model2["output"], Float8Linear)


def test_amax_groups_can_differ_per_layer():
    """Column- and row-parallel layers share different operands over tp: a function of the name picks."""
    tp = object()  # stands for a process group; groups are only used when a cast all-reduces
    model = nn.ModuleDict({"w1": nn.Linear(64, 128), "w2": nn.Linear(128, 64)})
    convert_to_float8(model, "tensorwise", amax_groups=lambda name: AmaxGroups(
        weight=(tp,), input=(tp,) if name == "w2" else (), grad_output=(tp,) if name == "w1" else ()))
    assert model["w1"].amax_groups == AmaxGroups(weight=(tp,), grad_output=(tp,))
    assert model["w2"].amax_groups == AmaxGroups(weight=(tp,), input=(tp,))


def test_delayed_scaling_state_travels_in_the_state_dict():
    torch.manual_seed(0)
    model = convert_to_float8(nn.Sequential(nn.Linear(64, 64)), "delayed", skip=(), amax_history_len=4)
    x = torch.randn(16, 64)
    for _ in range(3):
        model(x).sum().backward()
        update_float8_scales(model)
    state = model.state_dict()
    assert {"0.input_scale.amax_history", "0.weight_scale.scale", "0.grad_output_scale.initialized"} <= set(state)
    fresh = convert_to_float8(nn.Sequential(nn.Linear(64, 64)), DelayedRecipe(amax_history_len=4), skip=())
    assert not fresh[0].input_scale.ready
    fresh.load_state_dict(state)
    assert fresh[0].input_scale.ready
    torch.testing.assert_close(fresh[0].input_scale.scale, model[0].input_scale.scale)
    assert torch.equal(fresh(x), model(x))
    assert fresh[0].weight_scale.fmt == E4M3
