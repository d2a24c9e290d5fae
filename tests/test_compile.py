"""`train.compile`: compiled transformer blocks train like eager ones, FP8 included, under every
kind of layout (FP8 all-gather too); FP8 layers compile into the block's graph without breaks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from angelptm.config import ModelConfig
from angelptm.distributed.parity import TINY_JOB, compare, run_layout, run_layouts
from angelptm.fp8 import Float8Linear, convert_to_float8, update_float8_scales
from angelptm.models.llama import build_llama, rope_tables

from conftest import TINY_MODEL

COMPILE = ["train.compile=true"]
JOB = {**TINY_JOB, "train": {**TINY_JOB["train"], "steps": 8}}


@pytest.fixture(scope="module")
def eager_reference():
    return run_layout(job=JOB)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(eager_reference):
    compiled = run_layout(job=JOB, overrides=COMPILE)
    loss_diff, weight_diff = compare(compiled, eager_reference)
    # Inductor fuses and reorders float32 arithmetic: rounding-level differences, nothing more.
    assert loss_diff < 1e-5 and weight_diff < 1e-3, (loss_diff, weight_diff)


@pytest.mark.slow
def test_compiled_blocks_keep_layout_parity(eager_reference):
    """Collectives inside a block (tp, ring cp) run eagerly between compiled graphs."""
    for layout, result in zip(({"tp": 2}, {"cp": 2}), run_layouts([{"tp": 2}, {"cp": 2}], 2, JOB, COMPILE)):
        loss_diff, _ = compare(result, eager_reference)
        assert loss_diff < 1e-4, (layout, loss_diff)
        assert result.comm_bytes[next(iter(layout))] > 0  # the collectives ran and were counted
    zero3 = run_layout({"dp": 2}, 2, JOB, COMPILE + ["zero.stage=3"])
    assert compare(zero3, eager_reference)[0] < 1e-4


@pytest.mark.slow
def test_fp8_all_gather_layers_run_eagerly_inside_compiled_blocks():
    """ZeRO-3 hands each FP8 layer its gathered FP8 weight from Python state: those layers run
    eagerly between graphs, and the run follows eager FP8 training (a stale weight drifts away)."""
    fp8 = ["zero.stage=3", "precision.fp8.enabled=true"]
    eager = run_layout({"dp": 2}, 2, JOB, fp8)
    compiled = run_layout({"dp": 2}, 2, JOB, fp8 + COMPILE + ["precision.fp8.fp8_all_gather=true"])
    assert compare(compiled, eager)[0] < 5e-4


def _mlp(recipes) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for recipe in recipes:
        layers += [Float8Linear(64, 64, recipe=recipe), nn.GELU()]
    return nn.Sequential(*layers)


def _train(model: nn.Module, run: nn.Module, steps: int = 4, microbatches: int = 2) -> list[float]:
    """Losses of every microbatch; the weights change every step (fused AdamW), so a stale FP8
    weight would show."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(microbatches):
            loss = run(torch.randn(32, 64, generator=gen)).square().mean()
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        update_float8_scales(model)
    return losses


@pytest.mark.slow
def test_compiled_fp8_layers_follow_eager_step_by_step(one_thread):
    recipes = ("tensorwise", "delayed", "rowwise")
    eager = _mlp(recipes)
    compiled = _mlp(recipes)
    eager_losses = _train(eager, eager)
    compiled_losses = _train(compiled, torch.compile(compiled, fullgraph=True))
    assert max(abs(a - b) / a for a, b in zip(compiled_losses, eager_losses)) < 1e-4
    # Delayed scaling recorded its amaxes in the compiled forward and backward: same histories.
    delayed = compiled[2]
    assert delayed.recipe.name == "delayed"
    for role in ("input", "weight", "grad_output"):
        got, want = getattr(delayed, f"{role}_scale"), getattr(eager[2], f"{role}_scale")
        assert got.ready and torch.all(got.amax_history[1:5] > 0)  # one amax per step, 4 steps
        torch.testing.assert_close(got.amax_history, want.amax_history, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.scale, want.scale, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_blockwise_layer_runs_its_gemm_outside_the_graph(one_thread):
    """The blockwise GEMM stays out of the graph; the layer then runs eagerly, bit for bit."""
    eager, compiled = _mlp(["blockwise"]), _mlp(["blockwise"])
    assert _train(compiled, torch.compile(compiled), steps=2) == _train(eager, eager, steps=2)


@pytest.mark.slow
def test_fp8_transformer_block_compiles_into_one_graph(one_thread):
    cfg = ModelConfig(**TINY_MODEL)
    block = convert_to_float8(build_llama(cfg, "cpu"), "tensorwise").layers["0"]
    assert sum(isinstance(m, Float8Linear) for m in block.modules()) == 7
    x = torch.randn(2, 16, cfg.dim, requires_grad=True)
    cos, sin = rope_tables(cfg.dim // cfg.n_heads, torch.arange(16), cfg.rope_theta)
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    out = torch.compile(block, fullgraph=True)(x, cos, sin)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
