"""FP8 expert GEMMs: the grouped FP8 linear against float64 and against one Float8Linear per expert
(uneven groups, an empty one, every recipe), its weight cache and shared input cast, its grouped-kernel
path against an emulation of `torch._scaled_grouped_mm`'s contract; a tiny MoE model trained in FP8
against fp32 with the router in full precision; FP8 experts under ep2 against the FP8 single process."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from angelptm.config import ModelConfig, MoEConfig
from angelptm.distributed.parity import TINY_JOB, compare, run_layout
from angelptm.fp8 import Float8Experts, Float8Linear, convert_to_float8, recipe_from_name
from angelptm.fp8.grouped import scaled_grouped_mm_works
from angelptm.models.llama import build_llama
from angelptm.models.moe import GroupedExperts

from test_fp8_training import synthetic_batches, train_steps

RECIPES = ["tensorwise", "delayed", "rowwise", "blockwise"]
SIZES = [37, 0, 5, 86]  # uneven, one expert without a token, none a multiple of 16
DIM, HIDDEN = 64, 96


def bound(recipe: str, operands: tuple[str, str]) -> float:
    """What FP8 rounding allows a GEMM of two quantized operands, relative to the norm of the exact
    result: the sum of the two formats' unit roundoffs (each element of each operand is off by at
    most that much, relative, and the product of the two errors is of second order)."""
    r = recipe_from_name(recipe)
    formats = {"input": r.input_format, "weight": r.weight_format, "grad_output": r.grad_format}
    return sum(formats[role].unit_roundoff for role in operands)


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference).norm() / reference.norm()).item()


def grouped_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(SIZES)
    x = torch.randn(rows, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(len(SIZES), HIDDEN, DIM, generator=gen, dtype=torch.float64) * 0.1
    dy = torch.randn(rows, HIDDEN, generator=gen, dtype=torch.float64)
    return x, weight, dy


def fp8_grouped(recipe: str, x, weight, dy, dtype=torch.float32):
    xi, wi = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    y = Float8Experts(recipe).linear(xi, wi, "w1", SIZES)
    y.backward(dy.to(dtype))
    return y.detach(), xi.grad, wi.grad


@pytest.mark.parametrize("recipe", RECIPES)
def test_grouped_linear_is_within_fp8_rounding_of_float64(recipe):
    x, weight, dy = grouped_problem()
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y_ref = torch.cat([rows @ w.T for rows, w in zip(xr.split(SIZES), wr)])
    y_ref.backward(dy)
    y, dx, dw = fp8_grouped(recipe, x, weight, dy)
    errors = {"y": relative(y, y_ref.detach()), "dx": relative(dx, xr.grad), "dw": relative(dw, wr.grad)}
    bounds = {"y": bound(recipe, ("input", "weight")), "dx": bound(recipe, ("grad_output", "weight")),
              "dw": bound(recipe, ("grad_output", "input"))}
    for name, error in errors.items():
        assert 0 < error < bounds[name], (recipe, errors)
    assert torch.all(dw[1] == 0)  # the expert without a token


@pytest.mark.parametrize("recipe", RECIPES)
def test_grouped_linear_is_one_float8_linear_per_expert(recipe):
    """Every group is computed exactly as a Float8Linear of its expert's weight on its rows (delayed
    scaling: experts take current scaling, which is the first step of a delayed Float8Linear)."""
    x, weight, dy = grouped_problem(1)
    y, dx, dw = fp8_grouped(recipe, x, weight, dy)
    start = 0
    for expert, n in enumerate(SIZES):
        if n == 0:
            continue
        linear = nn.Linear(DIM, HIDDEN, bias=False)
        linear.weight.data.copy_(weight[expert])
        layer = Float8Linear.from_linear(linear, recipe)
        rows = x[start:start + n].float().requires_grad_()
        out = layer(rows)
        out.backward(dy[start:start + n].float())
        torch.testing.assert_close(y[start:start + n], out.detach(), rtol=0, atol=0)
        torch.testing.assert_close(dx[start:start + n], rows.grad, rtol=0, atol=0)
        torch.testing.assert_close(dw[expert], layer.weight.grad, rtol=0, atol=0)
        start += n


def test_weights_are_cast_once_per_optimizer_step():
    experts = Float8Experts("rowwise")
    w = nn.Parameter(grouped_problem()[1].float())
    first = experts.quantized_weight("w1", w, need_t=True)[0]
    w.data.add_(1.0)  # an update the version counter misses, as fused optimizers make
    assert experts.quantized_weight("w1", w, need_t=True)[0] is first
    other = nn.Parameter(torch.zeros(1))
    other.grad = torch.zeros(1)
    torch.optim.SGD([other], lr=0.0).step()  # any optimizer step drops every FP8 weight cache
    second = experts.quantized_weight("w1", w, need_t=True)[0]
    assert second is not first and not torch.equal(second.data, first.data)


def test_w1_and_w3_share_the_cast_of_their_rows(monkeypatch):
    experts = GroupedExperts(len(SIZES), DIM, HIDDEN)
    for w in experts.parameters():
        nn.init.normal_(w, std=0.1)
    convert_to_float8(experts, "rowwise")
    casts = []
    quantize = experts.float8.quantize
    monkeypatch.setattr(experts.float8, "quantize", lambda role, x, **kw: casts.append(role) or quantize(role, x, **kw))
    x = grouped_problem()[0].float().requires_grad_()
    experts.compute(x, torch.tensor(SIZES)).sum().backward()
    groups = sum(n > 0 for n in SIZES)
    # x once for w1 and w3, the hidden rows once for w2; three output gradients; one weight each
    assert casts.count("input") == 2 * groups and casts.count("grad_output") == 3 * groups
    assert casts.count("weight") == 3 * len(SIZES)


def test_cpu_has_no_scaled_grouped_mm_and_takes_the_per_group_gemms():
    assert scaled_grouped_mm_works(torch.device("cpu")) is False


def emulated_scaled_grouped_mm(calls, a, b, scale_a, scale_b, offs, out_dtype, use_fast_accum):
    """torch._scaled_grouped_mm's 2d x 3d case as its CUDA kernel documents it, layout checks included:
    a (M, K) row-major e4m3, b (G, K, N) column-major e4m3, scale_a (M,), scale_b (G, N), int32 group ends."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.stride(1) == 1 and b.stride(1) == 1
    assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[2]) and offs.dtype == torch.int32
    assert out_dtype == torch.bfloat16 and scale_a.is_contiguous() and scale_b.is_contiguous()
    calls.append(use_fast_accum)
    starts = [0] + offs.tolist()[:-1]
    out = torch.cat([(a[s:e].float() * scale_a[s:e, None]) @ (b[g].float() * scale_b[g])
                     for g, (s, e) in enumerate(zip(starts, offs.tolist()))])
    return out.to(out_dtype)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_the_grouped_kernel_path_computes_what_the_per_group_gemms_do(recipe, monkeypatch):
    """Where `torch._scaled_grouped_mm` works (bf16 out, all-e4m3 operands), the codes and scales it
    is handed give the per-group GEMMs' result; emulated here from the kernel's documented contract."""
    x, weight, dy = grouped_problem(2)
    looped = fp8_grouped(recipe, x, weight, dy, torch.bfloat16)
    calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm",
                        lambda *args, **kwargs: emulated_scaled_grouped_mm(calls, *args, **kwargs), raising=False)
    scaled_grouped_mm_works.cache_clear()
    try:
        assert scaled_grouped_mm_works(torch.device("cpu"))
        calls.clear()
        grouped = fp8_grouped(recipe, x, weight, dy, torch.bfloat16)
    finally:
        scaled_grouped_mm_works.cache_clear()
    # forward with fast accumulation; rowwise's input gradient too (tensorwise's E5M2 gradient loops)
    assert calls == ([True, False] if recipe == "rowwise" else [True])
    for ours, want in zip(grouped, looped):
        torch.testing.assert_close(ours, want, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# A tiny MoE model in training

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=64, max_seq_len=32,
                  moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=64))
# Attention kept in full precision too, so that the first router's input is that of fp32.
FP8_ONLY_EXPERTS = ("output", "embedding", *(f"layers.{i}.attention" for i in range(CFG.n_layers)))


def moe_model(recipe):
    torch.manual_seed(0)
    model = build_llama(CFG, "cpu")
    model.init_weights(seed=0)
    if recipe is not None:
        convert_to_float8(model, recipe, skip=FP8_ONLY_EXPERTS)
    return model


def loss_of(model, batch) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def train(recipe) -> list[float]:
    return train_steps(moe_model(recipe))


@pytest.fixture(scope="module")
def full_precision() -> list[float]:
    return train(None)


def test_experts_are_skipped_by_name_like_linear_layers():
    model = convert_to_float8(build_llama(CFG, "meta"), "rowwise", skip=("output", "experts"))
    assert all(m.float8 is None for m in model.modules() if isinstance(m, GroupedExperts))
    assert any(isinstance(m, Float8Linear) for m in model.modules())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_experts_train_within_2_percent_of_fp32(recipe, full_precision):
    losses = train(recipe)
    final, reference = sum(losses[-20:]) / 20, sum(full_precision[-20:]) / 20
    assert reference < 0.5 * full_precision[0], "the fp32 run must learn for the comparison to mean anything"
    assert abs(final - reference) / reference < 0.02, f"fp8 {final:.4f} vs fp32 {reference:.4f}"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_expert_gradients_are_fp8_and_the_router_stays_full_precision(recipe):
    batch = synthetic_batches(CFG.vocab_size)[0]
    grads, logits = {}, {}
    for name, rec in (("fp32", None), ("fp8", recipe)):
        model = moe_model(rec)
        experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
        assert all((m.float8 is not None) == (rec is not None) for m in experts) and len(experts) == CFG.n_layers
        assert not any(isinstance(m, Float8Linear) for m in model.modules())  # attention skipped here
        first_router = model.layers["0"].feed_forward.router
        first_router.register_forward_hook(lambda mod, args, out: logits.__setitem__(name, out.logits))
        loss_of(model, batch).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    # The first router sees the same input, and computes in float32 either way: the same logits.
    assert torch.equal(logits["fp8"], logits["fp32"])
    fp8, fp32 = grads["fp8"], grads["fp32"]
    for name in fp32:
        error = relative(fp8[name], fp32[name].double())
        if ".experts." in name:  # FP8 GEMMs: off by FP8 rounding, never exact
            assert 0 < error < bound(recipe, ("grad_output", "input")), (name, error)
        elif "router" in name:  # full-precision GEMM; its gradient reads the experts' FP8 outputs
            assert error < bound(recipe, ("input", "weight")), (name, error)


# ---------------------------------------------------------------------------------------------
# Expert parallelism

FP8_MOE_JOB = {**TINY_JOB,
               "model": {**TINY_JOB["model"], "moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32,
                                                      "first_dense_layers": 1}},
               "train": {**TINY_JOB["train"], "steps": 8, "micro_batch": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_experts_under_ep2_track_the_fp8_single_process(recipe):
    overrides = ["precision.fp8.enabled=true", f"precision.fp8.recipe={recipe}"]
    reference = run_layout(world_size=1, job=FP8_MOE_JOB, overrides=overrides)
    run = run_layout({"dp": 2, "ep": 2}, 2, FP8_MOE_JOB, overrides)
    loss_diff, _ = compare(run, reference)
    assert loss_diff < 1e-3, loss_diff  # the bound of tests/test_parity.py's FP8 layouts
    assert run.comm_bytes["ep"] > 0
